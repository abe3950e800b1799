"""Distributed helpers: single-process fallbacks and a real 2-process gloo group on 127.0.0.1."""

from __future__ import annotations

import os
import pickle
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pix2seq import distributed as D

WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_fallbacks(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = D.init_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.is_main, info.distributed) == (
        0,
        1,
        0,
        True,
        False,
    )
    assert not D.is_dist() and D.is_main() and D.get_world_size() == 1
    D.barrier()
    assert D.all_gather_object({"a": 1}) == [{"a": 1}]
    assert D.broadcast_object("x") == "x"
    t = torch.tensor([1, 2, 3])
    out = D.all_reduce_mean(t)
    assert out.dtype == torch.float32 and torch.equal(out, t.float())
    assert D.agree(True) is True and D.agree(0) is False
    D.cleanup()


def test_world_size_without_master_addr_fails_clearly(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        D.init_distributed()


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    info = D.init_distributed(timeout_s=60)
    try:
        out = {
            "info": (info.rank, info.world_size, info.local_rank, str(info.device), info.is_main),
            "is_main": D.is_main(),
            "backend": torch.distributed.get_backend(),
            "gather": D.all_gather_object({"rank": rank, "ids": list(range(rank + 1))}),
            "bcast": D.broadcast_object(f"from-{rank}", src=1),
            "mean": D.all_reduce_mean(torch.tensor([float(rank), 10.0 * rank])).tolist(),
            "mean_int": D.all_reduce_mean(torch.tensor(rank + 1)).item(),
            # rank 0 says stop, rank 1 says go on: both must follow rank 0
            "agree": D.agree(rank == 0),
            "agree2": D.agree(rank == 1),
        }
        D.barrier()
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(out, f)
    finally:
        D.cleanup()


@pytest.mark.slow
def test_two_gloo_processes(tmp_path):
    mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn"
    )
    res = {}
    for rank in range(WORLD):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
            res[rank] = pickle.load(f)
    for rank, r in res.items():
        assert r["info"] == (rank, 2, rank, "cpu", rank == 0)
        assert r["is_main"] is (rank == 0)
        assert r["backend"] == "gloo"
        assert r["gather"] == [{"rank": 0, "ids": [0]}, {"rank": 1, "ids": [0, 1]}]
        assert r["bcast"] == "from-1"
        assert r["mean"] == [0.5, 5.0]
        assert r["mean_int"] == 1.5
        assert r["agree"] is True and r["agree2"] is False
