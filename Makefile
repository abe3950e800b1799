# Stable-Pix2Seq daily commands. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PY   := .venv/bin/python
P2S  := bin/pix2seq
UV   := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1
export PATH := $(CURDIR)/.venv/bin:$(PATH)

# `make train train.lr=1e-3 GPUS=2`: command-line assignments whose name has a dot are config overrides
OVERRIDES := $(foreach v,$(MAKEOVERRIDES),$(if $(findstring .,$(firstword $(subst =, ,$(v)))),$(v)))

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

# `setup`: the locked environment the pipeline needs (lean: what `make demo` installs);
# `setup-official`: plus the `official` extra (tensorflow-cpu, to read the official TensorFlow
# checkpoints: `pix2seq weights convert` and its tests). Both sync --inexact, so neither removes what
# the other installed.
setup: .venv/.synced  ## install uv when missing, then the locked environment
.venv/.synced: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --locked --inexact
	@touch $@

setup-official: .venv/.synced-official  ## setup + the `official` extra (TensorFlow, for `pix2seq weights convert`)
.venv/.synced-official: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --locked --inexact --extra official
	@touch $@

test: setup-official  ## run the test suite (installs the `official` extra)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup  ## ruff check + format check
	$(PY) -m ruff check src tests bench scripts
	$(PY) -m ruff format --check src tests bench scripts

demo: setup  ## the whole DVC pipeline on generated data (<= 10 min on 2 CPU cores); safe to run twice
	@start=$$(date +%s); .venv/bin/dvc repro && $(PY) scripts/demo_summary.py $$start

pipeline: setup  ## dvc repro: download -> prepare -> train -> evaluate (params.yaml)
	.venv/bin/dvc repro

train: setup  ## train (resumes from the last checkpoint); GPUS=N, key.sub=value overrides
	$(P2S) train $(OVERRIDES)

eval: setup  ## evaluate the best checkpoint; key.sub=value overrides
	$(P2S) eval $(OVERRIDES)

ui: setup  ## the MLflow UI on the repo's store (mlflow.db) at http://127.0.0.1:5000
	@case "$${MLFLOW_TRACKING_URI:-}" in http://*|https://*) echo "MLFLOW_TRACKING_URI is a tracking server: open $$MLFLOW_TRACKING_URI in a browser"; exit 0;; esac; \
	.venv/bin/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --host 127.0.0.1 --port $${PORT:-5000}

.PHONY: help setup setup-official test lint demo pipeline train eval ui

# `make predict IMAGES="a.jpg photos/" [MODEL=models:/pix2seq@champion|path/model.pt] [OUT=reports/predict]
#  [DEVICE=auto|cpu|cuda] [SCORE=0.3] [FORMAT=json|coco] [eval.decoding=beam ...]`
predict: setup  ## detect objects: IMAGES="a.jpg dir/" [MODEL=uri|model.pt] [OUT=dir] [DEVICE=cpu] [SCORE=0.3] [FORMAT=coco]
	@test -n "$(IMAGES)" || { echo "usage: make predict IMAGES='img.jpg folder/' [MODEL=models:/pix2seq@champion] [OUT=reports/predict]" >&2; exit 2; }
	$(P2S) predict $(IMAGES) --model "$(or $(MODEL),models:/pix2seq@champion)" --out "$(or $(OUT),reports/predict)" \
		$(if $(DEVICE),--device $(DEVICE)) $(if $(SCORE),--score-threshold $(SCORE)) $(if $(FORMAT),--format $(FORMAT)) \
		$(filter-out $(IMAGES),$(OVERRIDES))

mlflow-server: setup  ## team MLflow server: MLFLOW_BACKEND_STORE_URI=postgresql://... [MLFLOW_ARTIFACTS_DESTINATION MLFLOW_HOST MLFLOW_PORT]
	bash scripts/mlflow_server.sh

.PHONY: predict mlflow-server

bench: setup  ## benchmarks: decoding caches, training step, loader, COCO eval (GPU if any) -> table + reports/bench.json
	$(PY) bench/run_all.py $(BENCH_ARGS)

.PHONY: bench

# `make tune tune.n_trials=3 tune.trial_minutes=0.5`: the study of this configuration (tune.study_name plus
# a digest of what a trial trains, in tune.storage) resumes where it stopped; GPUS=N runs every trial as
# one torchrun job on N GPUs. More workers on the same study, on any machine (share MLFLOW_TRACKING_URI
# too for one MLflow study run):
#   make tune-worker STORAGE=postgresql://user@db-host/optuna      (CUDA_VISIBLE_DEVICES=i GPUS=1: a worker per GPU)
tune: setup  ## Optuna study over train.lr x train.batch_repeat -> reports/best_params.json; key.sub=value overrides
	$(P2S) tune $(if $(STORAGE),"tune.storage=$(STORAGE)") $(OVERRIDES)

tune-worker: setup  ## one more worker on the study: STORAGE=postgresql://... (default: tune.storage)
	$(P2S) tune --worker $(if $(STORAGE),"tune.storage=$(STORAGE)") $(OVERRIDES)

train-best: setup  ## train with the best params of this configuration's study; key.sub=value overrides
	@best="$$($(P2S) tune --best-overrides $(if $(STORAGE),"tune.storage=$(STORAGE)") $(OVERRIDES))" && \
	echo "best params: $$best" && set -x && $(P2S) train $$best $(OVERRIDES)

dashboard: setup  ## optuna-dashboard on the study storage at http://127.0.0.1:8080 (PORT=..., STORAGE=...)
	.venv/bin/optuna-dashboard "$$($(P2S) tune --print-storage $(if $(STORAGE),"tune.storage=$(STORAGE)") $(OVERRIDES))" \
		--host 127.0.0.1 --port $${PORT:-8080}

.PHONY: tune tune-worker train-best dashboard
