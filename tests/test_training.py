"""The training engine: DDP equivalence, exact resume after SIGKILL, the NaN guard, MLflow records."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config

from pix2seq.checkpoint import CheckpointManager, load_checkpoint
from pix2seq.config import load_config
from pix2seq.engine import NonFiniteLossError
from pix2seq.tracking import champions
from pix2seq.training import run_training

REPO = Path(__file__).resolve().parents[1]
DETERMINISTIC = {  # no randomness in the data: N processes see exactly the samples 1 process sees
    "data.augment": "none",
    "data.hflip": 0.0,
    "tokenizer.order": "none",
    "tokenizer.augment_sequence": False,
    "tokenizer.class_corruption": False,
}


def _env(store: str) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=store, MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO / "src")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("GPUS", None)
    return env


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


@pytest.fixture(scope="module")
def single_process_run(tiny_prepared, tmp_path_factory):
    """One in-process training (world size 1) with a global batch of 4, tracked in a private store."""
    root, prepared = tiny_prepared
    tmp = tmp_path_factory.mktemp("single")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = store
    try:
        cfg = load_config(
            None,
            tiny_train_config(
                root,
                prepared,
                tmp / "run",
                **DETERMINISTIC,
                **{"tracking.register": True, "train.eval_every_epochs": 1},
            ),
        )
        result = run_training(cfg)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        import mlflow

        mlflow.set_tracking_uri(None)
    return cfg, result, store, tmp


@pytest.mark.slow
def test_two_processes_equal_one_process(single_process_run, tiny_prepared, tmp_path):
    cfg1, result1, _, _ = single_process_run
    root, prepared = tiny_prepared
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    over = tiny_train_config(
        root,
        prepared,
        tmp_path / "ddp",
        **DETERMINISTIC,
        **{"train.batch_size": 2, "train.eval_every_epochs": 1},
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "pix2seq.cli",
        "train",
        "--params",
        str(params),
        *over,
    ]
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        env=_env(f"sqlite:///{tmp_path / 'mlflow.db'}"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _weights(result1.output_dir), _weights(tmp_path / "ddp")
    init = load_checkpoint(result1.output_dir / "checkpoints" / "last.pt")
    assert (
        init["global_step"]
        == load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")["global_step"]
        == 12
    )
    moved = 0
    for k in one:
        assert torch.allclose(one[k].float(), two[k].float(), rtol=1e-3, atol=2e-5), k
        moved += 1
    assert moved > 10


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(tiny_prepared, tmp_path, mlflow_store):
    root, prepared = tiny_prepared
    # randomness everywhere: augmentation, object order, sequence noise, class corruption, dropout
    over = {
        "data.augment": "lsj",
        "model.dropout": 0.1,
        "train.epochs": 3,
        "train.checkpoint_every_steps": 2,
        "train.eval_every_epochs": 1,
    }
    ref_cfg = load_config(None, tiny_train_config(root, prepared, tmp_path / "ref", **over))
    run_training(ref_cfg)

    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    killed_dir = tmp_path / "killed"
    cmd = [
        str(REPO / "bin" / "pix2seq"),
        "train",
        "--params",
        str(params),
        *tiny_train_config(root, prepared, killed_dir, **over),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=_env(mlflow_store),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not list((killed_dir / "checkpoints").glob("ckpt-*.pt")):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # the kill may land between ckpt-<step>.pt and its last.pt link: read what resume will read
    _, at_kill_state = CheckpointManager(killed_dir / "checkpoints").load_latest()
    at_kill = at_kill_state["global_step"]
    assert 0 < at_kill < 18, "the kill must land mid-training"

    resumed = run_training(load_config(None, tiny_train_config(root, prepared, killed_dir, **over)))
    assert resumed.global_step == 18
    ref, res = _weights(tmp_path / "ref"), _weights(killed_dir)
    for k in ref:
        assert torch.equal(ref[k], res[k]), f"{k} differs after resume from step {at_kill}"


def test_non_finite_loss_stops_naming_the_step(tiny_prepared, tmp_path, mlflow_store, monkeypatch):
    import pix2seq.training as training

    real_build = training.build_model

    def build_with_nan(cfg, vocab):
        model, criterion = real_build(cfg, vocab)
        calls = {"n": 0}
        forward = criterion.forward

        def nan_on_third(*a, **k):
            calls["n"] += 1
            loss = forward(*a, **k)
            return loss * float("nan") if calls["n"] == 3 else loss

        criterion.forward = nan_on_third
        return model, criterion

    monkeypatch.setattr(training, "build_model", build_with_nan)
    root, prepared = tiny_prepared
    cfg = load_config(
        None, tiny_train_config(root, prepared, tmp_path / "nan", **{"train.checkpoint_every_steps": 1})
    )
    with pytest.raises(NonFiniteLossError, match=r"at step 3 \(epoch 0, batch 3\)"):
        run_training(cfg)
    # the last checkpoint is the healthy step 2, never the poisoned weights
    last = load_checkpoint(tmp_path / "nan" / "checkpoints" / "last.pt")
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_mlflow_run_reads_back(single_process_run):
    from mlflow import MlflowClient

    cfg, result, store, tmp = single_process_run
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert float(run.data.params["train.lr"]) == pytest.approx(cfg.train.lr)
    assert run.data.params["model.backbone"] == "resnet18"
    assert run.info.run_name.startswith("train-20")  # readable (the DVC experiment's name under dvc exp run)
    metrics = set(run.data.metrics)
    assert {f"val/{k}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "best_AP")} <= metrics
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "train/epoch_loss"} <= metrics
    assert not {m for m in metrics if "/" not in m}, "every metric carries its phase as a prefix"
    assert len(client.get_metric_history(result.run_id, "val/AP")) == 2  # one per epoch
    images = [a.path for a in client.list_artifacts(result.run_id, "images") if a.path.endswith(".png")]
    assert sorted(p.split("+step+")[1].split("+")[0] for p in images) == [
        "12",
        "6",
    ]  # the grid at every evaluation
    assert "git.commit" in run.data.tags
    # the precision choice is logged with the run (float32 here: train.amp off, or forced by conftest)
    from pix2seq.precision import choose

    assert run.data.tags["precision.dtype"] == "fp32"
    assert run.data.tags["precision.reason"] == choose(cfg.train.amp, "cpu").reason
    assert {d.dataset.digest for d in run.inputs.dataset_inputs}
    arts = {a.path for a in client.list_artifacts(result.run_id)}
    assert "config.yaml" in arts and "checkpoints" in arts and "train_summary.json" in arts
    (best,) = client.list_artifacts(result.run_id, "checkpoints")  # best.pt only, without optimizer state
    assert best.path == "checkpoints/best.pt"
    local = client.download_artifacts(result.run_id, best.path, str(tmp / "dl"))
    assert "optimizer" not in load_checkpoint(local) and "model" in load_checkpoint(local)
    (model,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert model.source_run_id == result.run_id
    ((task, version),) = champions(cfg.tracking.model_name, store).items()
    mv = client.get_model_version(cfg.tracking.model_name, version)
    assert (
        mv.run_id == result.run_id and mv.tags["task"] == task and task.startswith(Path(cfg.data.root).name)
    )
    losses = [m.value for m in client.get_metric_history(result.run_id, "train/loss")]
    assert losses[-1] < losses[0]


def test_wall_clock_budget_evaluates_mid_epoch(tiny_prepared, tmp_path, mlflow_store):
    """A minutes budget shorter than an epoch still evaluates on its period (tuning trials prune on it)."""
    root, prepared = tiny_prepared
    over = {
        "train.epochs": 1000,
        "train.max_minutes": 0.08,
        "train.eval_every_minutes": 0.02,
        "train.eval_every_epochs": 0,
        "train.batch_size": 2,
        "data.max_val_images": 4,
    }
    result = run_training(load_config(None, tiny_train_config(root, prepared, tmp_path / "clock", **over)))
    history = (tmp_path / "clock" / "plots" / "train_minutes.csv").read_text().splitlines()[1:]
    minutes = [float(r.split(",")[1]) for r in history]
    assert len(minutes) >= 3, minutes
    assert all(b > a for a, b in zip(minutes, minutes[1:], strict=False))
    assert minutes[-1] >= 0.08 - 1e-3 and result.global_step > 0
    summary = load_checkpoint(tmp_path / "clock" / "checkpoints" / "last.pt")
    assert summary["epoch"] < 1000


def test_cpu_optimizer_is_fused_and_matches_the_reference_adamw():
    """train.fused_adamw uses the fused kernel on CPU too; its update equals torch's per-tensor AdamW."""
    import copy
    import dataclasses

    from pix2seq.config import TrainConfig
    from pix2seq.optim import build_optimizer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    ref = copy.deepcopy(net)
    tcfg = TrainConfig(lr=1e-2, weight_decay=0.05)
    fused = build_optimizer(net, tcfg, torch.device("cpu"))
    plain = build_optimizer(ref, dataclasses.replace(tcfg, fused_adamw=False), torch.device("cpu"))
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    start = [p.detach().clone() for p in net.parameters()]
    x = torch.randn(32, 8)
    for _ in range(5):
        for model, opt in ((net, fused), (ref, plain)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b, a0 in zip(net.parameters(), ref.parameters(), start, strict=True):
        assert not torch.equal(a, a0)  # the steps moved every parameter
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_eval_batch_size_for_the_device(monkeypatch):
    """eval.batch_size 0: 16 on a CPU; on CUDA as many 640 px images as half the memory holds."""
    from types import SimpleNamespace

    from pix2seq.engine import eval_batch_size

    assert eval_batch_size(5, torch.device("cpu")) == 5
    assert eval_batch_size(0, torch.device("cpu")) == 16
    for gib, expected in ((2, 8), (16, 32), (80, 128), (141, 256)):
        props = SimpleNamespace(total_memory=gib * 2**30)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _d, p=props: p)
        assert eval_batch_size(0, torch.device("cuda")) == expected, gib
    assert eval_batch_size(0, torch.device("cuda"), image_size=1280) == 64  # 141 GiB, 4x the pixels
