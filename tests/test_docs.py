"""README stays true: every config key is documented, and the quickstart commands exist."""

from __future__ import annotations

from pathlib import Path

from pix2seq.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]


def test_readme_documents_every_config_key():
    readme = (REPO / "README.md").read_text()
    missing = [k for k in Config().flat() if f"`{k}`" not in readme]
    assert not missing, f"README lacks: {missing}"


def test_shipped_configs_load():
    for path in [REPO / "params.yaml", *sorted((REPO / "configs").glob("*.yaml"))]:
        load_config(path)


def test_quickstart_targets_exist():
    makefile = (REPO / "Makefile").read_text()
    for target in ("setup", "demo", "test", "pipeline", "train", "eval", "tune", "ui", "bench", "lint"):
        assert f"\n{target}:" in makefile, target
