"""Start a command on every local GPU through torchrun when it was not launched that way already.

``pix2seq train`` then does the right thing on a laptop (one process), on a machine with N GPUs
(``torchrun --standalone --nproc_per_node N``, N from ``GPUS`` or the GPU count) and under an
explicit multi-node ``torchrun`` (left alone: torchrun sets ``LOCAL_RANK``).
"""

from __future__ import annotations

import os
import sys

import torch

from pix2seq.errors import Pix2SeqError


class LaunchError(Pix2SeqError):
    """A bad ``GPUS`` value."""


def wanted_processes() -> int:
    env = os.environ.get("GPUS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise LaunchError(f"GPUS: expected a number of processes, got {env!r}") from None
        if n < 1:
            raise LaunchError(f"GPUS: must be >= 1, got {n}")
        if n > 1 and torch.cuda.is_available() and n > torch.cuda.device_count():
            raise LaunchError(f"GPUS={n}, but only {torch.cuda.device_count()} CUDA devices are visible")
        return n
    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def relaunch_under_torchrun(target: list[str], processes: int | None = None) -> None:
    """Replace this process by torchrun running ``target`` (``[script, *args]`` or
    ``["-m", module, *args]``) when more than one process is wanted.

    ``processes``: how many; default :func:`wanted_processes` (``GPUS`` or the GPU count).
    """
    if "LOCAL_RANK" in os.environ:
        return
    n = wanted_processes() if processes is None else processes
    if n == 1:
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *target]
    print("launching:", " ".join(cmd), flush=True)
    os.execv(sys.executable, cmd)
