"""The registered pyfunc model: in-process ``mlflow.pyfunc`` and a real ``mlflow models serve``.

A tiny model is trained once per session into a temporary SQLite store (``run_training`` registers
it as ``pix2seq`` and points its task's ``champion-<task>`` alias at it); ``test_cli`` reuses it through
:func:`registered_model_info`.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import tiny_train_config
from postgres_fixture import free_port, stop_process_group, wait_for_http

mlflow = pytest.importorskip("mlflow")

MODEL_NAME = "pix2seq"


def champion_uri(registered: dict) -> str:
    """``models:/pix2seq@champion-<task>`` of the session's registered model (its only task)."""
    from pix2seq.tracking import champions

    (task,) = champions(MODEL_NAME, registered["uri"])
    return f"models:/{MODEL_NAME}@champion-{task}"


# ------------------------------------------------------------------------- shared tiny training


def tiny_overrides(root: Path, prepared: Path, out: Path, **over) -> list[str]:
    """conftest's tiny training, one epoch with an evaluation, registered under its own experiment."""
    base = {
        "train.epochs": 1,
        "train.eval_every_epochs": 1,
        "tracking.register": True,
        "tracking.experiment": "pix2seq-test",
    }
    base.update(over)
    return tiny_train_config(root, prepared, out, **base)


def prepare_tiny(root: Path, dest: Path) -> Path:
    """The prepare stage on ``tiny_generated``'s data -> the prepared dir (manifests)."""
    from pix2seq.config import PrepareConfig
    from pix2seq.data.prepare import prepare_dataset

    prepared = dest / "prepared"
    if not (prepared / "val2017.json").is_file():
        prepare_dataset(
            root, ["train2017", "val2017"], prepared, None, PrepareConfig(), workers=1, progress=False
        )
    return prepared


def train_tiny(root: Path, base: Path, tracking_uri: str, **over):
    """Train + register into ``tracking_uri``; returns the TrainResult. Restores MLflow's global URI."""
    from pix2seq.config import load_config
    from pix2seq.training import run_training

    prepared = prepare_tiny(root, base)
    cfg = load_config(None, tiny_overrides(root, prepared, base / "out", **over))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        try:
            return run_training(cfg)
        finally:
            while mlflow.active_run() is not None:
                mlflow.end_run()
            mlflow.set_tracking_uri(None)


def registered_model_info(tmp_path_factory, tiny_generated) -> dict:
    """Train once per session (cached on disk under the session's base temp dir): a dict with
    ``uri`` (sqlite store), ``run_id``, ``model_pt`` (the slim export), ``best_pt``, ``root``,
    ``val_images`` and ``categories``."""
    base = tmp_path_factory.getbasetemp() / "registered-model"
    marker = base / "info.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    base.mkdir(parents=True, exist_ok=True)
    root, _ = tiny_generated
    uri = f"sqlite:///{base / 'mlflow.db'}"
    result = train_tiny(Path(root), base, uri)
    assert result.run_id, "training did not start an MLflow run"
    coco = json.loads((Path(root) / "annotations" / "instances_val2017.json").read_text())
    info = {
        "uri": uri,
        "run_id": result.run_id,
        "model_pt": str(base / "out" / "model.pt"),
        "best_pt": str(base / "out" / "checkpoints" / "best.pt"),
        "root": str(root),
        "val_images": [str(Path(root) / "val2017" / im["file_name"]) for im in coco["images"]],
        "categories": coco["categories"],
    }
    marker.write_text(json.dumps(info))
    return info


@pytest.fixture(scope="session")
def registered(tmp_path_factory, tiny_generated) -> dict:
    return registered_model_info(tmp_path_factory, tiny_generated)


def b64(path: str | Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def assert_detections(row: dict, category_ids: set[int], width: int, height: int) -> None:
    boxes, scores, labels = row["boxes"], row["scores"], row["labels"]
    assert isinstance(boxes, list) and len(boxes) == len(scores) == len(labels)
    assert len(row["category_ids"]) == len(row["names"]) == len(labels)
    for b in boxes:
        assert len(b) == 4
        x0, y0, x1, y1 = (float(v) for v in b)
        assert -1e-3 <= x0 <= x1 <= width + 1e-3 and -1e-3 <= y0 <= y1 <= height + 1e-3, b
    assert all(0.0 <= float(s) <= 1.0 for s in scores)
    assert set(int(c) for c in row["category_ids"]) <= category_ids


# ------------------------------------------------------------------------------ decoding inputs


def test_input_layouts_and_base64_variants():
    """Every accepted layout yields the same encoded images; bad cells fail naming the row."""
    import numpy as np
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from pix2seq.serving import _decode, _image_values

    raw = bytes(range(256)) * 3
    s = base64.b64encode(raw).decode()
    for layout in (
        pd.DataFrame({"image": [s, s]}),
        {"image": [s, s]},
        [s, s],
        [{"image": s}, {"image": s}],
        np.array([s, s], dtype=object),
        pd.Series([s, s]),
    ):
        values = _image_values(layout)
        assert [_decode(i, v) for i, v in enumerate(values)] == [raw, raw], type(layout)
    wrapped = "\n".join(s[i : i + 76] for i in range(0, len(s), 76))  # `base64` without -w0
    assert _decode(0, wrapped) == raw
    assert _decode(0, "data:image/png;base64," + s) == raw
    assert _decode(0, base64.urlsafe_b64encode(raw).decode().rstrip("=")) == raw
    assert _decode(0, raw) == raw
    with pytest.raises(MlflowException, match="row 3: not a base64"):
        _decode(3, "not base64 !!")
    with pytest.raises(MlflowException, match="row 1: empty image"):
        _decode(1, "")
    with pytest.raises(MlflowException, match="column named 'image'"):
        _image_values(pd.DataFrame({"img": [s]}))


# ----------------------------------------------------------------------------------- in-process


def test_pyfunc_load_and_predict(registered):
    """``mlflow.pyfunc.load_model('models:/pix2seq@champion-<task>').predict(DataFrame)`` -> detections;
    the logged model carries a validation image as its input example."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(registered["uri"])
    try:
        client = mlflow.tracking.MlflowClient(registered["uri"])
        uri = champion_uri(registered)
        mv = client.get_model_version_by_alias(MODEL_NAME, uri.rsplit("@", 1)[1])
        assert mv.run_id == registered["run_id"]
        model = mlflow.pyfunc.load_model(uri)
        example = model.input_example
        assert list(example.columns) == ["image"] and len(example) == 1
        assert base64.b64decode(example["image"][0]) == Path(registered["val_images"][0]).read_bytes()
    finally:
        mlflow.set_tracking_uri(None)
    schema = model.metadata.get_input_schema()
    assert schema is not None and schema.input_names() == ["image"]
    assert [p.name for p in model.metadata.get_params_schema().params] == ["score_threshold"]

    images = registered["val_images"][:3]
    cats = {int(c["id"]) for c in registered["categories"]}
    out = model.predict(pd.DataFrame({"image": [b64(p) for p in images]}))
    assert isinstance(out, pd.DataFrame) and len(out) == 3
    assert list(out.columns) == ["boxes", "scores", "labels", "category_ids", "names"]
    for _, row in out.iterrows():
        assert_detections(row.to_dict(), cats, 64, 64)
    assert sum(len(r) for r in out["boxes"]) > 0  # max_instances 4: an untrained model still answers

    strict = model.predict(pd.DataFrame({"image": [b64(images[0])]}), params={"score_threshold": 1.01})
    assert strict["boxes"].tolist() == [[]]

    with pytest.raises(MlflowException, match="row 1: cannot decode image"):
        model.predict(pd.DataFrame({"image": [b64(images[0]), base64.b64encode(b"not an image").decode()]}))


# ---------------------------------------------------------------------------------- over HTTP


def _post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.mark.slow
def test_mlflow_models_serve_http(registered, tmp_path):
    """``mlflow models serve -m models:/pix2seq@champion-<task>`` answers POST /invocations on 127.0.0.1."""
    port = free_port()
    bindir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registered["uri"],
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PIX2SEQ_DEVICE": "cpu",
        # `--env-manager local` starts `uvicorn` by name: the venv's bin must be on PATH
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
    }
    cmd = [str(Path(bindir) / "mlflow"), "models", "serve", "-m", champion_uri(registered), "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", "1"]  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=tmp_path,
                                start_new_session=True)  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, timeout=120, log=log)
        url = f"http://127.0.0.1:{port}/invocations"
        images = registered["val_images"][:2]
        cats = {int(c["id"]) for c in registered["categories"]}

        status, body = _post(url, {
            "dataframe_split": {"columns": ["image"], "data": [[b64(p)] for p in images]},
            "params": {"score_threshold": 0.0},
        })  # fmt: skip
        assert status == 200, body
        preds = body["predictions"]
        assert len(preds) == 2
        for row in preds:
            assert set(row) == {"boxes", "scores", "labels", "category_ids", "names"}
            assert_detections(row, cats, 64, 64)
        assert sum(len(r["boxes"]) for r in preds) > 0

        status, body = _post(url, {"inputs": {"image": [b64(images[0])]}})
        assert status == 200, body
        assert len(body["predictions"]) == 1
        assert body["predictions"][0]["boxes"] == preds[0]["boxes"]  # greedy decoding: deterministic

        status, body = _post(
            url, {"dataframe_records": [{"image": b64(images[0])}], "params": {"score_threshold": 1.01}}
        )
        assert status == 200 and body["predictions"][0]["boxes"] == [], body

        status, body = _post(url, {"dataframe_split": {"columns": ["image"], "data": [["bm90IGFuIGltYWdl"]]}})
        assert status == 400, body
        assert "row 0" in body.get("message", ""), body
    finally:
        stop_process_group(proc)
    assert proc.poll() is not None
