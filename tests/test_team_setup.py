"""The team setup on real servers: PostgreSQL + `make mlflow-server` (scripts/mlflow_server.sh) with
proxied artifacts, a training run tracked through it, read back with MlflowClient, and
`pix2seq predict` on the registered champion.

Needs Debian's PostgreSQL server binaries (``apt-get install -y postgresql``); skipped with the
reason otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from postgres_fixture import free_port, postgres_dsn, stop_process_group, wait_for_http  # noqa: F401
from test_serving import train_tiny

mlflow = pytest.importorskip("mlflow")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "mlflow_server.sh"


def _server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_BIN=str(Path(sys.executable).parent / "mlflow"), **extra
    )
    return env


def test_server_script_rejects_a_missing_or_non_postgres_store():
    for uri, expect in (("", "MLFLOW_BACKEND_STORE_URI is not set"), ("sqlite:///x.db", "PostgreSQL URI"),
                        ("postgres://u@h/db", "postgresql://")):  # fmt: skip
        r = subprocess.run(["bash", str(SCRIPT)], env=_server_env(MLFLOW_BACKEND_STORE_URI=uri),
                           capture_output=True, text=True, timeout=30)  # fmt: skip
        assert r.returncode == 2 and expect in r.stderr, (uri, r.stderr)


@pytest.fixture(scope="module")
def tracking_server(postgres_dsn, tmp_path_factory):  # noqa: F811
    """scripts/mlflow_server.sh on 127.0.0.1 against PostgreSQL; yields (uri, artifacts dir, dsn)."""
    base = tmp_path_factory.mktemp("mlflow-server")
    artifacts = base / "artifacts"
    port = free_port()
    env = _server_env(
        MLFLOW_BACKEND_STORE_URI=postgres_dsn,
        MLFLOW_ARTIFACTS_DESTINATION=str(artifacts),
        MLFLOW_HOST="127.0.0.1",
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="1",
    )
    log = base / "server.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, cwd=base, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        wait_for_http(
            f"http://127.0.0.1:{port}/health", proc, timeout=240, log=log
        )  # first start migrates the schema
        yield f"http://127.0.0.1:{port}", artifacts, postgres_dsn
    finally:
        stop_process_group(proc)
    assert proc.poll() is not None


@pytest.mark.slow
def test_training_run_tracked_on_postgres_server(
    tracking_server, tiny_generated, tmp_path, capsys, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from pix2seq.cli import main
    from pix2seq.tracking import champions, resolve_model

    monkeypatch.chdir(tmp_path)  # nothing may fall back to a default store in the repository

    uri, artifacts, dsn = tracking_server
    root, _ = tiny_generated
    result = train_tiny(Path(root), tmp_path, uri, **{"tracking.experiment": "team-setup"})
    assert result.run_id

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["model.d_model"] == "64" and p["model.backbone"] == "resnet18" and p["train.epochs"] == "1"
    m = run.data.metrics
    assert {"val/AP", "val/AP50", "val/AP75", "val/best_AP", "train/loss"} <= set(m), sorted(m)
    assert m["val/best_AP"] == pytest.approx(result.best_ap)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "team-setup" and exp.artifact_location.startswith("mlflow-artifacts:")

    names = {f.path for f in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "train_summary.json", "checkpoints"} <= names, names
    ckpts = {f.path for f in client.list_artifacts(result.run_id, "checkpoints")}
    assert ckpts == {"checkpoints/best.pt"}, ckpts
    assert list(artifacts.rglob("best.pt")), "artifacts did not reach --artifacts-destination"

    ((task, version),) = champions("pix2seq", uri).items()
    mv = client.get_model_version("pix2seq", version)
    assert (
        mv.run_id == result.run_id
        and mv.tags["AP"] == repr(float(result.best_ap))
        and mv.tags["task"] == task
    )
    # resolved with explicit URIs (no global MLflow state), artifacts proxied by the server
    resolved = resolve_model(f"models:/pix2seq/{mv.version}", tmp_path / "dl", tracking_uri=uri)
    local = resolved.checkpoint.parents[1]
    assert (local / "MLmodel").is_file() and resolved.checkpoint == local / "artifacts" / "model.pt"
    assert list(artifacts.rglob("model.pt")), "the logged model is not in --artifacts-destination"

    import psycopg2  # the records really are in PostgreSQL

    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs WHERE run_uuid = %s", (result.run_id,))
        assert cur.fetchone()[0] == 1
        cur.execute("SELECT count(*) FROM model_versions WHERE name = 'pix2seq'")
        assert cur.fetchone()[0] >= 1
    conn.close()

    coco = json.loads((Path(root) / "annotations" / "instances_val2017.json").read_text())
    img = Path(root) / "val2017" / coco["images"][0]["file_name"]
    out = tmp_path / "predict"
    code = main(["predict", str(img), "--model", "models:/pix2seq@champion", "--tracking-uri", uri,
                 "--out", str(out), "--device", "cpu", "--score-threshold", "0"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rep = json.loads((out / "detections.json").read_text())
    assert len(rep["images"]) == 1 and rep["errors"] == []
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
