"""Which precision, and which convolution layout, is fast on this device: chosen by measuring.

::

    dtype = autocast_dtype(cfg.train.amp, device)   # torch.bfloat16 or None (float32)
    choice = choose(cfg.train.amp, device)          # the same, with what it was based on
    choice.tags()                                   # {"precision.dtype": "bf16", ...} for MLflow
    use_channels_last(device)                       # the encoder at evaluation: channels-last or not

``train.amp``: ``off`` is float32, ``bf16`` is bf16 autocast everywhere, ``auto`` is bf16 on CUDA
and, on a CPU, whichever of the two ran a small representative workload faster here (a ResNet
bottleneck's convolutions and a transformer MLP, forward and backward under autocast, as training
and evaluation run them). A CPU without native bf16 instructions (no ``avx512_bf16`` / ``amx_bf16``
/ ``bf16`` flag) gets float32 without measuring. The measurement takes a few seconds, once per CPU
model and torch version (on one thread): it is cached in ``~/.cache/pix2seq/precision.json``
(``PIX2SEQ_PRECISION_CACHE`` names another file). ``PIX2SEQ_CPU_AMP=bf16|fp32`` skips the
measurement (tests; a user who knows). Training and evaluation share the choice, and training logs
it with the run (MLflow tags ``precision.*``).

Channels-last: the same measurement times the convolutions in both layouts; evaluation and
prediction run the encoder channels-last with bf16 where that was faster (on CUDA always with
bf16: tensor cores prefer it). Float32 keeps the default layout, so its results stay bit-identical.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pix2seq.atomic import atomic_write_text
from pix2seq.config import ConfigError
from pix2seq.errors import Pix2SeqError

AMP_MODES = ("auto", "bf16", "off")
CACHE_ENV = "PIX2SEQ_PRECISION_CACHE"
FORCE_ENV = "PIX2SEQ_CPU_AMP"
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX-512 BF16 / AMX; aarch64 BF16
_FIELDS = {"fp32_per_s", "bf16_per_s", "channels_last_fp32", "channels_last_bf16"}  # a cache entry
_WORKLOAD_VERSION = 1  # part of the cache key: a changed workload is measured again


@dataclass(frozen=True)
class Choice:
    """A precision decision and what it was based on (throughputs in workload runs per second)."""

    dtype: torch.dtype | None  # None: float32
    reason: str
    fp32_per_s: float | None = None
    bf16_per_s: float | None = None
    channels_last: bool = False

    @property
    def name(self) -> str:
        return "fp32" if self.dtype is None else "bf16"

    def describe(self) -> str:
        speeds = ""
        if self.fp32_per_s is not None and self.bf16_per_s is not None:
            speeds = f"; measured fp32 {self.fp32_per_s:.2f}/s, bf16 {self.bf16_per_s:.2f}/s"
        return f"precision {self.name} ({self.reason}{speeds}); channels-last encoder: {self.channels_last}"

    def tags(self) -> dict[str, str]:
        """MLflow tags for the run."""
        out = {"precision.dtype": self.name, "precision.reason": self.reason}
        if self.fp32_per_s is not None:
            out["precision.fp32_per_s"] = f"{self.fp32_per_s:.3f}"
        if self.bf16_per_s is not None:
            out["precision.bf16_per_s"] = f"{self.bf16_per_s:.3f}"
        out["precision.channels_last"] = str(self.channels_last).lower()
        return out


def autocast_dtype(amp: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device``; None means float32 (no autocast)."""
    return choose(amp, device).dtype


def use_channels_last(amp: str, device: torch.device | str) -> bool:
    """Run the encoder channels-last at evaluation: with bf16, where measured faster (float32 keeps
    the layout, so its results stay bit-identical)."""
    return choose(amp, device).channels_last


def choose(amp: str, device: torch.device | str) -> Choice:
    if amp not in AMP_MODES:
        raise ConfigError(f"train.amp: must be one of {list(AMP_MODES)}, got {amp!r}")
    forced = os.environ.get(FORCE_ENV, "").strip().lower()
    return _choose(amp, torch.device(device).type, forced, str(cache_path()))


@functools.cache  # once per process and setting (the measurement itself is cached on disk)
def _choose(amp: str, device_type: str, forced: str, cache_file: str) -> Choice:
    if amp == "off":
        return Choice(None, "train.amp: off")
    if device_type == "cuda":
        return Choice(torch.bfloat16, f"CUDA (train.amp: {amp})", channels_last=True)
    if device_type != "cpu":
        return Choice(torch.bfloat16 if amp == "bf16" else None, f"{device_type} (train.amp: {amp})")
    if forced not in ("", "bf16", "fp32"):
        raise Pix2SeqError(f"{FORCE_ENV}: must be bf16 or fp32, got {forced!r} (or unset it to measure)")
    if forced:  # no measurement, no layout change
        dtype = torch.bfloat16 if amp == "bf16" or forced == "bf16" else None
        return Choice(dtype, f"train.amp: {amp}" if amp == "bf16" else f"{FORCE_ENV}={forced}")
    if not cpu_has_bf16():
        dtype = torch.bfloat16 if amp == "bf16" else None
        return Choice(dtype, f"train.amp: {amp}" if amp == "bf16" else "no native bf16 in this CPU's flags")
    m = _measured(Path(cache_file))
    faster = m["bf16_per_s"] > m["fp32_per_s"]
    if amp == "bf16":
        reason = "train.amp: bf16"
    else:
        reason = f"measured on this CPU: {'bf16' if faster else 'fp32'} faster"
    bf16 = amp == "bf16" or faster
    return Choice(
        torch.bfloat16 if bf16 else None,
        reason,
        m["fp32_per_s"],
        m["bf16_per_s"],
        channels_last=bf16 and bool(m["channels_last_bf16"]),
    )


# ------------------------------------------------------------------------------------ measuring


def cpu_has_bf16() -> bool:
    """True when the CPU flags list native bf16 instructions (or cannot be read: then measure)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & _BF16_FLAGS) if flags else True


def cache_path() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "pix2seq" / "precision.json"


def _machine_key() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{model} | torch {torch.__version__} | {capability} | workload v{_WORKLOAD_VERSION}"


def _measured(path: Path) -> dict:
    """This machine's measurement: from the cache file, or measured now and written there."""
    key = _machine_key()
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        entries = {}
    if not isinstance(entries, dict):
        entries = {}
    entry = entries.get(key)
    if isinstance(entry, dict) and _FIELDS <= set(entry):
        return entry
    entry = measure()
    entries[key] = entry
    try:  # atomic: concurrent processes (ranks) each write a whole file
        atomic_write_text(path, json.dumps(entries, indent=1))
    except OSError:
        pass  # a read-only home: measure again next time
    return entry


class _Workload(nn.Module):
    """A ResNet bottleneck's convolutions and a transformer MLP: what the model spends its time on."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(256, 64, 1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 256, 1), nn.BatchNorm2d(256),
        )  # fmt: skip
        self.mlp = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.conv(images).float().mean() + self.mlp(tokens).float().mean()


def measure(rounds: int = 3) -> dict:
    """Workload runs per second (forward + backward) in float32 and under bf16 autocast, and whether
    channels-last convolutions are faster in each; best of ``rounds`` interleaved runs, on one
    thread (the kernels' relative speed, about 3 s; on a busy machine more threads only add noise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(rounds)
    finally:
        torch.set_num_threads(threads)


def _measure(rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    model = _Workload()
    images = torch.randn(2, 256, 40, 40, generator=g)
    tokens = torch.randn(512, 256, generator=g)

    def run(dtype: torch.dtype | None, channels_last: bool, backward: bool = True) -> float:
        """Training (forward + backward), or the convolutions as evaluation runs them."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=fmt).train(backward)
        x = images.contiguous(memory_format=fmt)
        amp = torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)
        iters = 2 if backward else 6
        for i in range(iters + 1):  # the first one warms up (a layout change re-creates oneDNN primitives)
            if i == 1:
                t = time.perf_counter()
            with amp, torch.set_grad_enabled(backward):
                loss = model(x, tokens) if backward else model.conv(x).float().mean()
            if backward:
                loss.backward()
        return (time.perf_counter() - t) / iters

    best: dict[tuple, float] = {}
    for _ in range(rounds):
        for dtype in (None, torch.bfloat16):
            for cl, backward in ((False, True), (False, False), (True, False)):
                s = run(dtype, cl, backward)
                k = (dtype, cl, backward)
                best[k] = min(best.get(k, float("inf")), s)
    model.zero_grad(set_to_none=True)
    return {
        "fp32_per_s": round(1.0 / best[(None, False, True)], 3),
        "bf16_per_s": round(1.0 / best[(torch.bfloat16, False, True)], 3),
        "channels_last_fp32": best[(None, True, False)] < best[(None, False, False)],  # recorded only
        "channels_last_bf16": best[(torch.bfloat16, True, False)] < best[(torch.bfloat16, False, False)],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


__all__ = ["AMP_MODES", "Choice", "autocast_dtype", "choose", "cpu_has_bf16", "measure", "use_channels_last"]
