"""Start a stage on every local GPU through torchrun when it was not launched that way already.

``python pipeline/train.py`` then does the right thing on a laptop (one process), on a machine with
N GPUs (``torchrun --standalone --nproc_per_node N``, N from ``GPUS`` or the GPU count) and under an
explicit multi-node ``torchrun`` (left alone: torchrun sets ``LOCAL_RANK``).
"""

from __future__ import annotations

import os
import sys

import torch

from pix2seq.errors import Pix2SeqError


def wanted_processes() -> int:
    env = os.environ.get("GPUS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise Pix2SeqError(f"GPUS: expected a number of processes, got {env!r}") from None
        if n < 1:
            raise Pix2SeqError(f"GPUS: must be >= 1, got {n}")
        if n > 1 and torch.cuda.is_available() and n > torch.cuda.device_count():
            raise Pix2SeqError(f"GPUS={n}, but only {torch.cuda.device_count()} CUDA devices are visible")
        return n
    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def relaunch_under_torchrun(script: str, argv: list[str], processes: int | None = None) -> None:
    """Replace this process by torchrun running ``script`` when more than one process is wanted.

    ``processes``: how many; default :func:`wanted_processes` (``GPUS`` or the GPU count).
    """
    if "LOCAL_RANK" in os.environ:
        return
    n = wanted_processes() if processes is None else processes
    if n == 1:
        return
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        script,
        *argv,
    ]
    print("launching:", " ".join(cmd), flush=True)
    os.execv(sys.executable, cmd)
