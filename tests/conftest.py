"""Shared fixtures. Nothing here may reach the network."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from http.server import ThreadingHTTPServer

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# train.amp auto on a CPU: tests keep float32 (as before) and never measure or write the user's
# precision cache; tests/test_precision.py exercises the measurement with its own cache file
os.environ.setdefault("PIX2SEQ_CPU_AMP", "fp32")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores: two intra-op threads plus any other busy process make every parallel op wait for a
# descheduled thread (measured 10-40x slower). One thread keeps test times stable.
torch.set_num_threads(1)

from pix2seq.config import GeneratedDataConfig  # noqa: E402
from pix2seq.data.synthetic import write_generated_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_generated(tmp_path_factory) -> tuple:
    """A small generated COCO-format dataset: (root, GeneratedDataConfig)."""
    root = tmp_path_factory.mktemp("generated")
    gcfg = GeneratedDataConfig(
        image_size=64,
        num_train=24,
        num_val=8,
        num_classes=3,
        max_objects=4,
        min_object_size=8,
        max_object_size=24,
    )
    write_generated_dataset(gcfg, root)
    return root, gcfg


def tiny_train_config(root, prepared, out, **over) -> list[str]:
    """key=value overrides for a tiny, fast training on the ``tiny_generated`` data."""
    base = {
        "data.source": "generated",
        "data.root": str(root),
        "data.prepared_dir": str(prepared),
        "data.image_size": 64,
        "data.num_workers": 0,
        "data.scale_min": 0.8,
        "data.scale_max": 1.2,
        "tokenizer.bins": 32,
        "tokenizer.max_instances": 4,
        "model.backbone": "resnet18",
        "model.backbone_stage": "layer3",
        "model.backbone_norm": "group",
        "model.d_model": 64,
        "model.heads": 4,
        "model.mlp_dim": 128,
        "model.encoder_layers": 1,
        "model.decoder_layers": 1,
        "model.dropout": 0.0,
        "model.drop_path": 0.0,
        "train.epochs": 2,
        "train.batch_size": 4,
        "train.batch_repeat": 1,
        "train.lr": 1e-3,
        "train.warmup_epochs": 0.5,
        "train.amp": "off",
        "train.output_dir": str(out),
        "train.eval_every_epochs": 0,
        "train.checkpoint_every_steps": 1000,
        "train.log_every_steps": 1,
        "eval.batch_size": 8,
        "tracking.log_system_metrics": False,
        "tracking.register": False,
    }
    base.update(over)
    return [f"{k}={v}" for k, v in base.items()]


class LocalHTTPServer(ThreadingHTTPServer):
    """A local test server on 127.0.0.1 that stays quiet when a client hangs up mid-response (the
    downloader refusing a file, a test cutting a read): socketserver would print a traceback into
    the test's captured stderr at a moment that depends on thread timing."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


@contextlib.contextmanager
def serving(server):
    """Run a ``socketserver`` server (a local HTTP test server) in a thread while the block runs."""
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def tiny_prepared(tiny_generated, tmp_path_factory):
    """(root, prepared_dir) of the tiny generated dataset after the prepare stage."""
    from pix2seq.config import PrepareConfig
    from pix2seq.data.prepare import prepare_dataset

    root, _ = tiny_generated
    prepared = tmp_path_factory.mktemp("prepared")
    prepare_dataset(
        root, ["train2017", "val2017"], prepared, prepared / "report.json", PrepareConfig(), progress=False
    )
    return root, prepared


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A private sqlite MLflow store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    import mlflow

    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def mlflow_template_store(tmp_path_factory):
    """An empty, migrated SQLite MLflow store (creating one takes seconds); copy it per use."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db
