"""Checkpoints: atomic writes, weights_only loads of the engine's layout, RNG round trip, pruning."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pix2seq import checkpoint as ck
from pix2seq.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from pix2seq.config import Config


def _full_state(step: int = 7) -> dict:
    """The layout the training engine saves, built from real torch objects."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    for _ in range(2):
        loss = model(torch.randn(5, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": capture_rng_state(),
        "epoch": 3,
        "step_in_epoch": 11,
        "global_step": step,
        "best_metric": 12.5,
        "config": Config().to_dict(),
        "vocab": {"num_classes": 4, "bins": 128, "vocab_size": 135},
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
    }


def _tmp_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_full_layout_survives_weights_only_load(tmp_path):
    state = _full_state()
    path = save_checkpoint(tmp_path / "c.pt", state)
    back = torch.load(path, weights_only=True)  # the strict loader itself, not only our wrapper
    assert set(back) == set(state)
    loaded = load_checkpoint(path)
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert loaded["scheduler"]["last_epoch"] == state["scheduler"]["last_epoch"]
    assert loaded["scaler"] == state["scaler"]
    assert loaded["config"] == state["config"]
    assert loaded["vocab"] == state["vocab"] and loaded["categories"] == state["categories"]
    assert (loaded["epoch"], loaded["step_in_epoch"], loaded["global_step"], loaded["best_metric"]) == (
        3,
        11,
        7,
        12.5,
    )
    # the optimizer state loads back into a fresh optimizer
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    model.load_state_dict(loaded["model"])
    torch.optim.AdamW(model.parameters()).load_state_dict(loaded["optimizer"])


def test_rng_restore_reproduces_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gauss_next in Python's state
    np.random.standard_normal()  # and a cached gaussian in NumPy's
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})

    def draw():
        return (
            [random.random() for _ in range(3)] + [random.gauss(0, 1)],
            np.random.rand(3).tolist() + [float(np.random.standard_normal())],
            torch.rand(3).tolist() + torch.randn(2).tolist(),
        )

    expected = draw()
    draw()  # move every generator on
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert draw() == expected

    # per-rank states (what rank 0 saves after all_gather_object): each rank takes its own entry
    torch.manual_seed(10)
    rank0 = capture_rng_state()
    torch.manual_seed(11)
    rank1 = capture_rng_state()
    save_checkpoint(tmp_path / "rng2.pt", {"rng": [rank0, rank1]})
    per_rank = load_checkpoint(tmp_path / "rng2.pt")["rng"]
    restore_rng_state(per_rank, rank=1)
    a = torch.rand(2)
    torch.manual_seed(11)
    assert torch.equal(a, torch.rand(2))


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"global_step": 1, "w": torch.ones(3)})
    before = path.read_bytes()

    # 1) the pickler fails half way through (an unpicklable value past the safety check)
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        save_checkpoint(path, {"global_step": 2, "w": torch.zeros(1000), "bad": lambda: 0}, check=False)
    assert path.read_bytes() == before and _tmp_files(tmp_path) == []

    # 2) the disk "fails" at fsync, after all bytes were written to the temp file
    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.os, "fsync", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, {"global_step": 3, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert path.read_bytes() == before and _tmp_files(tmp_path) == []
    assert load_checkpoint(path)["global_step"] == 1


def test_unsafe_values_rejected_at_save_time(tmp_path):
    with pytest.raises(CheckpointError, match=r"best_metric.*numpy"):
        save_checkpoint(tmp_path / "c.pt", {"best_metric": np.float64(1.0)})
    with pytest.raises(CheckpointError, match=r"config"):
        save_checkpoint(tmp_path / "c.pt", {"config": Config()})
    assert not (tmp_path / "c.pt").exists()


def test_corrupt_and_truncated_files_give_clear_errors(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", _full_state())
    data = good.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pt.*corrupt or truncated"):
        load_checkpoint(trunc)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(junk)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_code_carrying_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    p = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, p)
    with pytest.raises(
        CheckpointError, match=r"evil.pt: refused: it holds Python objects \(posix.system\)"
    ) as e:
        load_checkpoint(p)
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)  # never torch's advice


def test_manager_prunes_and_tracks_last_best(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpts", keep=2)
    assert mgr.latest() is None and mgr.load_latest() is None
    for step in (100, 200, 300, 400, 500):
        mgr.save({"global_step": step}, step=step, is_best=(step == 200))
    names = sorted(p.name for p in mgr.dir.iterdir())
    assert names == ["best.pt", "ckpt-400.pt", "ckpt-500.pt", "last.pt"]
    assert load_checkpoint(mgr.last_path)["global_step"] == 500
    assert load_checkpoint(mgr.best_path)["global_step"] == 200  # survives pruning of ckpt-200
    assert mgr.latest() == mgr.last_path
    assert _tmp_files(mgr.dir) == []

    # resume falls back past a damaged last.pt to the newest readable step checkpoint
    mgr.last_path.unlink()
    mgr.step_path(500).write_bytes(b"garbage")
    path, state = mgr.load_latest()
    assert path == mgr.step_path(400) and state["global_step"] == 400
