# Stable-Pix2Seq daily commands. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PY   := .venv/bin/python
UV   := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

setup: .venv/.synced  ## install uv when missing, then the locked environment
.venv/.synced: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --locked
	@touch $@

test: setup  ## run the test suite
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup  ## ruff check + format check
	$(PY) -m ruff check src tests pipeline bench scripts
	$(PY) -m ruff format --check src tests pipeline bench scripts

.PHONY: help setup test lint
