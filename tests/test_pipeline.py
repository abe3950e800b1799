"""The DVC pipeline is exact and its experiments compare.

- params.yaml holds every config key, in block style (what `dvc exp run -S` edits in place);
- every stage lists under ``deps:`` exactly the source files it can execute (a static import
  closure, reporting-only modules left out) and under ``params:`` exactly the keys it reads (recorded
  while the stage runs in-process, runtime keys left out);
- two ``dvc exp run -S train.lr=...`` experiments of a tiny configuration show different AP in
  ``dvc exp show --json``, and ``dvc plots diff`` renders both.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from pipeline_deps import COMMANDS, REPO, STAGE_MODULES, declared_sources, expand_params, source_closure

from pix2seq.config import known_keys, load_config, recording_reads, runtime_keys

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]
# keys a stage reads only under settings the recording run does not use (the stage lists them)
CONDITIONAL = {
    "data.detr_scales": "read with data.augment: detr (the recording run uses lsj)",
    "data.detr_crop": "read with data.augment: detr",
    "data.download.base_url": "read with data.source: coco (tests/test_download.py)",
    "data.download.subset": "read with data.source: coco",
    "data.download.max_train_images": "read with data.source: coco",
    "data.download.verify_checksums": "read with data.source: coco",
}


def test_params_yaml_holds_every_key_in_block_style():
    text = (REPO / "params.yaml").read_text()
    flat = load_config(REPO / "params.yaml").flat()
    values = yaml.safe_load(text)
    present = set()

    def walk(prefix: str, d: dict) -> None:
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + ".", v)
            else:
                present.add(key)

    walk("", values)
    missing = [k for k in flat if k not in present]
    assert not missing, (
        f"params.yaml lacks {missing}: add every key (block style) so `dvc exp run -S` can set it"
    )

    def flow(node: yaml.Node) -> list[str]:
        found = [f"line {node.start_mark.line + 1}"] if getattr(node, "flow_style", False) else []
        children = node.value if isinstance(node, yaml.SequenceNode) else []
        if isinstance(node, yaml.MappingNode):
            children = [v for _, v in node.value]
        return found + [f for c in children for f in flow(c)]

    inline = flow(yaml.compose(text))
    assert not inline, (
        f"params.yaml: flow style ({{...}} or [...]) at {inline}; `dvc exp run -S` rewrites it whole"
    )


def test_stages_run_the_command_line():
    for name, stage in STAGES.items():
        assert stage["cmd"] == f"bin/pix2seq {COMMANDS[name]}", f"dvc.yaml stages.{name}.cmd: run the CLI"


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_stage_lists_exactly_the_source_files_it_runs(stage):
    reads = source_closure(STAGE_MODULES[stage])
    listed = declared_sources(STAGES[stage]["deps"])
    missing, extra = sorted(reads - listed), sorted(listed - reads)
    assert not missing, f"dvc.yaml stages.{stage}.deps lacks {missing}: the stage imports them"
    assert not extra, (
        f"dvc.yaml stages.{stage}.deps lists {extra}: the stage never imports them (or they only report)"
    )


def _tiny(root: Path) -> dict[str, object]:
    """A tiny configuration every stage runs in seconds (1 class of large objects: AP > 0 after 16 steps)."""
    return {
        "data.root": f"{root}/data/generated",
        "data.prepared_dir": f"{root}/data/prepared",
        "data.image_size": 64,
        "data.num_workers": 0,
        "data.augment": "none",
        "data.generated.image_size": 64,
        "data.generated.num_train": 16,
        "data.generated.num_val": 8,
        "data.generated.num_classes": 1,
        "data.generated.min_objects": 1,
        "data.generated.max_objects": 1,
        "data.generated.min_object_size": 36,
        "data.generated.max_object_size": 56,
        "tokenizer.bins": 16,
        "tokenizer.max_instances": 2,
        "model.backbone": "resnet18",
        "model.backbone_stage": "layer3",
        "model.backbone_norm": "group",
        "model.d_model": 32,
        "model.heads": 2,
        "model.mlp_dim": 64,
        "model.encoder_layers": 1,
        "model.decoder_layers": 1,
        "model.dropout": 0.0,
        "model.drop_path": 0.0,
        "train.epochs": 8,
        "train.max_minutes": 0.0,
        "train.batch_size": 8,
        "train.batch_repeat": 1,
        "train.warmup_fraction": 0.0,
        "train.warmup_epochs": 0.0,
        "train.eval_every_epochs": 0,
        "train.eval_every_minutes": 0.0,
        "train.amp": "off",
        "train.output_dir": f"{root}/runs/train",
        "eval.batch_size": 8,
        "eval.num_vis": 4,
        "eval.output_dir": f"{root}/reports/eval",
        "tune.study_name": "tiny",
        "tune.storage": f"sqlite:///{root}/optuna.db",
        "tune.n_trials": 1,
        "tune.trial_epochs": 1,
        "tune.output": f"{root}/reports/best_params.json",
        "tracking.log_system_metrics": False,
        "tracking.register": False,
        "tracking.log_images": 2,
    }


@pytest.mark.slow
def test_stage_lists_exactly_the_keys_it_reads(tmp_path, monkeypatch, mlflow_store):
    """Each stage runs in-process once with every config read recorded; dvc.yaml must list exactly
    those keys (runtime keys excepted, and CONDITIONAL ones, which other settings read)."""
    from pix2seq.cli import main
    from pix2seq.tuning.study import EVALUATE_ONLY

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    gen = tmp_path / "gen"
    local = {  # data.source: local, linked to a generated dataset (the download stage reads data.local)
        "data.source": "local",
        "data.root": str(tmp_path / "data" / "mine"),
        "data.local.train_annotations": f"{gen}/annotations/instances_train2017.json",
        "data.local.train_images": f"{gen}/train2017",
        "data.local.val_annotations": f"{gen}/annotations/instances_val2017.json",
        "data.local.val_images": f"{gen}/val2017",
    }
    over = [f"{k}={v}" for k, v in {**_tiny(tmp_path), "data.augment": "lsj"}.items()]
    runtime, known = runtime_keys(), list(known_keys())
    read: dict[str, set[str]] = {}
    assert main(["download", *over, f"data.root={gen}"]) == 0  # the files data.source: local links
    for stage, extra in (("download", local), ("download", {}), ("prepare", {}), ("train", {}),
                         ("evaluate", {}), ("tune", {})):  # fmt: skip
        with recording_reads() as keys:
            assert main([COMMANDS[stage], *over, *(f"{k}={v}" for k, v in extra.items())]) == 0, stage
        read[stage] = read.get(stage, set()) | (keys - runtime)
    problems = []
    for stage, keys in read.items():
        listed = expand_params(STAGES[stage].get("params", []), known)
        for k in sorted(keys - listed):
            problems.append(f"stage {stage} reads {k}, but dvc.yaml stages.{stage}.params does not list it")
        for k in sorted(listed & runtime):
            problems.append(
                f"dvc.yaml stages.{stage}.params lists {k}, a runtime key: changing it must not re-run"
            )
        for k in sorted(listed - keys - runtime - set(CONDITIONAL)):
            problems.append(f"dvc.yaml stages.{stage}.params lists {k}, but stage {stage} never reads it")
    assert not problems, "\n".join(problems)
    assert not read["train"] & set(EVALUATE_ONLY), (
        "training reads an evaluate-only key (tuning's digest skips them)"
    )
    assert "eval.num_vis" not in read["train"] and "eval.num_vis" in read["evaluate"]


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
        cwd=cwd, check=True, capture_output=True,
    )  # fmt: skip


@pytest.mark.slow
def test_dvc_experiments_compare(tmp_path, mlflow_template_store):
    """Two `dvc exp run -S train.lr=...` experiments of a tiny configuration: `dvc exp show --json`
    reads a different AP for each, and `dvc plots diff` renders both, from a shell without the venv."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("src", "bin"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    (repo / ".venv").symlink_to(REPO / ".venv")  # what bin/pix2seq runs; not activated below
    cfg = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in _tiny(Path(".")).items():  # the tiny values, relative paths, in the full file
        *sections, leaf = key.split(".")
        node = cfg
        for s in sections:
            node = node[s]
        node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (repo / ".gitignore").write_text("/.venv\n/data/\n/runs/\n/reports/\n/mlflow.db\n/mlruns/\n/optuna.db\n")
    shutil.copy(mlflow_template_store, repo / "mlflow.db")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip
    dvc = str(REPO / ".venv" / "bin" / "dvc")
    _git(repo, "init", "-q")
    _git(repo, "config", "user.name", "t")  # experiments are commits
    _git(repo, "config", "user.email", "t@t")
    subprocess.run([dvc, "init", "-q"], cwd=repo, env=env, check=True)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "tiny")

    def run(*args: str) -> str:
        r = subprocess.run([dvc, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"dvc {' '.join(args)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    for lr in ("0.001", "0.003"):
        run("exp", "run", "-S", f"train.lr={lr}", "evaluate")
    shown = json.loads(run("exp", "show", "--json"))
    aps = {}
    for baseline in shown:  # the workspace, then the commit the experiments branch from
        for rev in (r for exp in baseline.get("experiments") or [] for r in exp["revs"]):
            data = rev["data"]
            lr = data["params"]["params.yaml"]["data"]["train"]["lr"]
            aps[lr] = data["metrics"]["reports/eval/metrics.json"]["data"]["AP"]
    assert set(aps) == {0.001, 0.003}, aps
    assert all(isinstance(v, float) and v > 0 for v in aps.values()) and aps[0.001] != aps[0.003], aps
    names = run("exp", "list", "--name-only").split()
    plots = json.loads(run("plots", "diff", *names, "--json"))["data"]
    revs = {r for p in plots.values() for item in p for r in item.get("revisions", [])}
    assert set(names) <= revs, (names, sorted(plots))
    assert {"AP per class", "precision-recall", "reports/eval/predictions.png"} <= set(plots), sorted(plots)
    assert (repo / "params.yaml").read_text().count("\n") == len(
        yaml.safe_dump(cfg, sort_keys=False).splitlines()
    )
