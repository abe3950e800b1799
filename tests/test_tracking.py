"""MLflow tracking against a throw-away SQLite store: runs, resume, datasets, images, the registry
with one champion per task, and model-spec resolution."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from pix2seq.config import Config
from pix2seq.tracking import (
    ModelNotFound,
    RunTracker,
    champions,
    default_tracking_uri,
    file_digest,
    find_repo_root,
    promote_champion,
    readable_run_name,
    register_model,
    resolve_model,
    sqlite_path,
    task_name,
)

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store (schema migrations are slow) in a tiny git repo used as the cwd."""
    root = tmp_path_factory.mktemp("repo")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "init"], cwd=root, check=True)
    sha = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        mp.chdir(root)
        yield {"root": root, "uri": uri, "sha": sha, "client": MlflowClient(tracking_uri=uri)}
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)  # also unsets the env var MLflow exported


def _cfg(**train) -> Config:
    cfg = Config()
    cfg.tracking.experiment = "test-exp"
    cfg.tracking.log_system_metrics = False
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_default_tracking_uri_and_repo_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert default_tracking_uri() == "http://tracking:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    exp = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc"
    exp.mkdir(parents=True)
    (exp / "params.yaml").write_text("seed: 0\n")
    assert find_repo_root(exp) == tmp_path.resolve()  # DVC temp workspaces log to the real repo
    assert sqlite_path("sqlite:///rel/m.db") == Path("rel/m.db")
    assert sqlite_path("sqlite:////abs/m.db") == Path("/abs/m.db")
    assert sqlite_path("sqlite:///:memory:") is None and sqlite_path("postgresql://u@h/db") is None
    monkeypatch.setenv("DVC_EXP_NAME", "exp-happy-fox")
    assert readable_run_name("train") == "exp-happy-fox"  # the name `dvc exp show` lists
    monkeypatch.delenv("DVC_EXP_NAME")
    assert readable_run_name("train").startswith("train-20")


def test_disabled_tracker_is_a_noop(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # would fail if contacted
    t = RunTracker(_cfg(), enabled=False, run_id_file=tmp_path / "rid")
    with t:
        t.log_params({"a": 1})
        t.log_metrics({"loss": 1.0}, step=1)
        t.set_tags({"x": "y"})
        t.log_artifact(tmp_path / "does-not-exist")
        t.log_dict({"a": 1}, "a.json")
        assert t.log_dataset(tmp_path / "nope.json", "train") is None
    assert t.run_id is None and not (tmp_path / "rid").exists()


def test_run_logs_params_metrics_artifacts_tags_dataset(store, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "exp-happy-fox")
    cfg = _cfg()
    cfg.data.detr_scales = list(range(480, 480 + 2000))  # a param value longer than MLflow's 6000 chars
    manifest = tmp_path / "train_manifest.json"
    manifest.write_text(
        json.dumps({"split": "train", "images": [{"id": 1}, {"id": 2}], "categories": [{"id": 1}]})
    )
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "per_class.md").write_text("| a |\n")
    (tmp_path / "metrics.json").write_text("{}")

    with RunTracker(
        cfg, run_name="happy", run_id_file=tmp_path / "mlflow_run_id", tags={"stage": "train"}
    ) as t:
        rid = t.run_id
        for step in (10, 20, 30):
            t.log_metrics({"train/loss": 1.0 / step, "lr": 1e-4, "skip": None}, step=step)
        t.log_artifact(tmp_path / "metrics.json")
        t.log_artifact(tmp_path / "reports", "reports")
        t.log_dict({"AP": 1.5}, "eval/metrics.json")
        t.log_artifact_as(tmp_path / "metrics.json", "checkpoints/best.json")
        digest = t.log_dataset(manifest, "generated-train", context="training")
        import torch

        for step in (10, 20):
            t.log_image(torch.full((3, 8, 12), step, dtype=torch.uint8), "val/predictions", step=step)

    c: MlflowClient = store["client"]
    run = c.get_run(rid)
    assert (tmp_path / "mlflow_run_id").read_text().strip() == rid
    assert run.info.status == "FINISHED" and run.info.run_name == "happy"
    assert c.get_experiment(run.info.experiment_id).name == "test-exp"
    # params: the whole flattened config, stringified, long values truncated
    flat = cfg.flat()
    assert set(run.data.params) == set(flat)
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.params["train.betas"] == "[0.9, 0.999]"
    assert len(run.data.params["data.detr_scales"]) == 6000 and run.data.params["data.detr_scales"].endswith(
        "..."
    )
    # metrics with their steps
    hist = c.get_metric_history(rid, "train/loss")
    assert [(m.step, m.value) for m in hist] == [(10, 0.1), (20, 0.05), (30, 1 / 30)]
    assert "skip" not in run.data.metrics
    # tags
    assert run.data.tags["git.commit"] == store["sha"]
    assert run.data.tags["dvc.exp_name"] == "exp-happy-fox"
    assert run.data.tags["stage"] == "train"
    # artifacts, stored beside the database (not in the cwd's ./mlruns)
    top = {a.path for a in c.list_artifacts(rid)}
    assert {"metrics.json", "reports", "eval", "images"} <= top
    assert [a.path for a in c.list_artifacts(rid, "checkpoints")] == ["checkpoints/best.json"]
    images = [a.path for a in c.list_artifacts(rid, "images")]  # one image per step, the step in its name
    assert len([p for p in images if p.endswith(".png")]) == 2 and any("+step+10+" in p for p in images), (
        images
    )
    assert [a.path for a in c.list_artifacts(rid, "reports")] == ["reports/per_class.md"]
    assert run.info.artifact_uri.startswith((store["root"] / "mlruns").resolve().as_uri())
    # dataset input
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "generated-train" and inp.dataset.digest == digest == file_digest(manifest)
    assert json.loads(inp.dataset.source)["uri"] == str(manifest.resolve())
    prof = json.loads(inp.dataset.profile)
    assert prof["num_images"] == 2 and prof["split"] == "train"
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"


def test_resume_continues_the_same_run(store, tmp_path):
    rid_file = tmp_path / "mlflow_run_id"
    with pytest.raises(KeyboardInterrupt):
        with RunTracker(_cfg(epochs=10), run_id_file=rid_file) as t:
            first = t.run_id
            t.log_metrics({"train/loss": 2.0}, step=1)
            raise KeyboardInterrupt
    c: MlflowClient = store["client"]
    assert c.get_run(first).info.status == "KILLED"

    with RunTracker(_cfg(epochs=20), run_id_file=rid_file, resume=True) as t:  # resumed with an edited config
        assert t.run_id == first and t.resumed
        t.log_metrics({"train/loss": 1.0}, step=2)
    run = c.get_run(first)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    assert run.data.params["train.epochs"] == "10"  # params are immutable ...
    assert run.data.tags["param_changed.train.epochs"] == "10 -> 20"  # ... the change is recorded
    assert [m.step for m in c.get_metric_history(first, "train/loss")] == [1, 2]

    with RunTracker(_cfg(), run_id_file=rid_file, resume=False) as t:  # a fresh training: a new run
        assert t.run_id != first
    assert rid_file.read_text().strip() == t.run_id


def test_failure_marks_run_failed_and_nesting(store):
    c: MlflowClient = store["client"]
    with pytest.raises(ValueError):
        with RunTracker(_cfg()) as t:
            failed = t.run_id
            raise ValueError("boom")
    assert c.get_run(failed).info.status == "FAILED"

    with RunTracker(_cfg(), run_name="study") as parent:
        with RunTracker(_cfg(), run_name="trial-0", parent_run_id=parent.run_id) as child:  # in-process
            pass
        assert mlflow.active_run().info.run_id == parent.run_id
    with RunTracker(_cfg(), run_name="trial-1", parent_run_id=parent.run_id) as late:  # e.g. another process
        pass
    for r in (child.run_id, late.run_id):
        assert c.get_run(r).data.tags["mlflow.parentRunId"] == parent.run_id


@pytest.mark.slow
def test_system_metrics(store):
    mlflow.set_system_metrics_sampling_interval(0.5)
    mlflow.set_system_metrics_samples_before_logging(1)
    try:
        with RunTracker(_cfg(), log_system_metrics=True) as t:
            deadline = time.time() + 15
            while time.time() < deadline:
                time.sleep(0.5)
                if any(k.startswith("system/") for k in store["client"].get_run(t.run_id).data.metrics):
                    break
    finally:
        mlflow.set_system_metrics_sampling_interval(None)
        mlflow.set_system_metrics_samples_before_logging(None)
    keys = store["client"].get_run(t.run_id).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in keys), sorted(keys)
    import torch

    if torch.cuda.is_available():  # nvidia-ml-py is a dependency: MLflow samples every GPU too
        assert any(k.startswith("system/gpu_0_") for k in keys), sorted(keys)


class _Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[int], params=None) -> list[int]:
        return [42] * len(model_input)


def test_one_champion_per_task(store, tmp_path):
    """Versions compete only within their task (validation set); `@champion` resolves to the task's
    champion when one task has one, and asks which otherwise."""
    c: MlflowClient = store["client"]
    name = "pix2seq-test"
    shapes, coco = task_name("generated", "3f2a9c1b" + "0" * 24), task_name("My COCO!", "8e1d" * 8)
    assert (shapes, coco) == ("generated-3f2a9c1b", "my-coco-8e1d8e1d")

    def version(ap: float, task: str) -> str:
        with RunTracker(_cfg()) as t:
            info = mlflow.pyfunc.log_model(
                name="model", python_model=_Constant(), pip_requirements=["mlflow"]
            )
        digest = task.rsplit("-", 1)[1] + "0" * 24
        return register_model(name, t.run_id, info.model_id, ap, task=task, val_digest=digest)

    v1 = version(30.0, shapes)
    assert promote_champion(name, v1) is True  # the first version of a task always becomes its champion
    resolved = resolve_model(f"models:/{name}@champion", tmp_path / "dl1")
    assert f"champion of task {shapes}" in resolved.source and resolved.pyfunc_dir is not None
    v2 = version(25.0, shapes)
    assert promote_champion(name, v2) is False  # worse on the same validation set
    v3 = version(10.0, coco)
    assert promote_champion(name, v3) is True  # another task: not compared with the shapes' 30 AP
    assert champions(name) == {shapes: v1, coco: v3}
    v4 = version(40.0, shapes)
    assert promote_champion(name, v4) is True and promote_champion(name, v4) is True  # idempotent
    assert promote_champion(name, v1) is False  # no going back to a worse version
    assert champions(name) == {shapes: v4, coco: v3}
    champ = c.get_model_version_by_alias(name, f"champion-{shapes}")
    assert (
        champ.tags["AP"] == "40.0"
        and champ.tags["task"] == shapes
        and champ.tags["val_digest"].startswith("3f2a")
    )

    with pytest.raises(ModelNotFound, match="champions for 2 tasks.*@champion-generated-3f2a9c1b"):
        resolve_model(f"models:/{name}@champion", tmp_path / "dl2")
    resolved = resolve_model(f"models:/{name}@champion-{coco}", tmp_path / "dl3")
    assert f"champion of task {coco}, v{v3}" in resolved.source
    model = mlflow.pyfunc.load_model(str(resolved.pyfunc_dir))
    assert list(model.predict([1, 2])) == [42, 42]
    with pytest.raises(ModelNotFound, match="no such file"):
        resolve_model(str(tmp_path / "nope.pt"), tmp_path)
    # official:NAME goes to pix2seq.weights.official (tests/test_official_download.py); an unknown name
    # fails there before any network, named with the spec
    with pytest.raises(
        ModelNotFound, match=r"^model official:resnet_9: unknown official model .*known: resnet_640"
    ):
        resolve_model("official:resnet_9", tmp_path)
