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

The decode step: where ``auto`` chose bf16 on a CPU, the measurement also times one decode step of a
COCO-shaped decoder (6 layers, d 256, 400 memory cells, 1,083 tokens, 256 positions filled) at
:data:`STEP_ROWS` rows in both precisions. A step reads every weight to produce a few rows, and bf16
kernels can cost more per call than the halved traffic saves: on the AMD EPYC of this project a
float32 step of ``generate`` is ~1.5x faster than a bf16-autocast one at 1 row, ~1.3x slower at 16.
:meth:`Choice.step_dtype` gives the step's precision for a batch (the measured size nearest in log
scale); the encoder keeps bf16.
"""

from __future__ import annotations

import functools
import json
import math
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
STEP_ROWS = (1, 16)  # decode-step batch sizes measured: one image, evaluation's CPU batch
# a cache entry (one without the step's timings, written by an older version, is measured again)
_FIELDS = {"fp32_per_s", "bf16_per_s", "channels_last_fp32", "channels_last_bf16", "step_ms"}
_WORKLOAD_VERSION = 1  # part of the cache key: a changed workload is measured again


@dataclass(frozen=True)
class Choice:
    """A precision decision and what it was based on (throughputs in workload runs per second)."""

    dtype: torch.dtype | None  # None: float32
    reason: str
    fp32_per_s: float | None = None
    bf16_per_s: float | None = None
    channels_last: bool = False
    # with bf16 chosen: the decode step's rows at which float32 measured faster (a subset of STEP_ROWS)
    step_fp32_rows: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return "fp32" if self.dtype is None else "bf16"

    def step_dtype(self, rows: int) -> torch.dtype | None:
        """The decode step's autocast dtype for ``rows`` rows (batch x beams): :attr:`dtype`, except
        float32 (None) where the float32 step measured faster at the measured size nearest to
        ``rows`` in log scale."""
        if not self.step_fp32_rows:
            return self.dtype
        nearest = min(STEP_ROWS, key=lambda r: abs(math.log(r) - math.log(max(rows, 1))))
        return None if nearest in self.step_fp32_rows else self.dtype

    def _step_note(self) -> str:
        if not self.step_fp32_rows:
            return ""
        return f"; decode step fp32 at {', '.join(map(str, self.step_fp32_rows))} row(s) (measured faster)"

    def describe(self) -> str:
        speeds = ""
        if self.fp32_per_s is not None and self.bf16_per_s is not None:
            speeds = f"; measured fp32 {self.fp32_per_s:.2f}/s, bf16 {self.bf16_per_s:.2f}/s"
        return (
            f"precision {self.name} ({self.reason}{speeds}); channels-last encoder: {self.channels_last}"
            + self._step_note()
        )

    def tags(self) -> dict[str, str]:
        """MLflow tags for the run."""
        out = {"precision.dtype": self.name, "precision.reason": self.reason}
        if self.fp32_per_s is not None:
            out["precision.fp32_per_s"] = f"{self.fp32_per_s:.3f}"
        if self.bf16_per_s is not None:
            out["precision.bf16_per_s"] = f"{self.bf16_per_s:.3f}"
        out["precision.channels_last"] = str(self.channels_last).lower()
        if self.step_fp32_rows:
            out["precision.step_fp32_rows"] = ",".join(map(str, self.step_fp32_rows))
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
        step_fp32_rows=_step_fp32_rows(m["step_ms"]) if bf16 and amp == "auto" else (),
    )


def _step_fp32_rows(step_ms: dict) -> tuple[int, ...]:
    """The measured row counts at which the float32 decode step was faster (``step_ms``:
    ``{"fp32": {"1": ms, ...}, "bf16": {...}}``, as the cache holds it)."""
    fp32, bf16 = step_ms.get("fp32", {}), step_ms.get("bf16", {})
    return tuple(r for r in STEP_ROWS if str(r) in fp32 and str(r) in bf16 and fp32[str(r)] < bf16[str(r)])


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
        "step_ms": _step_ms(rounds),
        "fp32_per_s": round(1.0 / best[(None, False, True)], 3),
        "bf16_per_s": round(1.0 / best[(torch.bfloat16, False, True)], 3),
        "channels_last_fp32": best[(None, True, False)] < best[(None, False, False)],  # recorded only
        "channels_last_bf16": best[(torch.bfloat16, True, False)] < best[(torch.bfloat16, False, False)],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _step_ms(rounds: int) -> dict:
    """:func:`step_ms` at each of :data:`STEP_ROWS` rows in float32 and bf16, best of ``rounds``."""
    best: dict[tuple[str, int], float] = {}
    for _ in range(rounds):
        for rows in STEP_ROWS:
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                ms = step_ms(rows, dtype)
                best[name, rows] = min(best.get((name, rows), float("inf")), ms)
    return {name: {str(r): round(best[name, r], 3) for r in STEP_ROWS} for name in ("fp32", "bf16")}


def step_ms(
    rows: int,
    dtype: torch.dtype,
    filled: int = 256,
    steps: int = 8,
    d_model: int = 256,
    heads: int = 8,
    mlp_dim: int = 1024,
    layers: int = 6,
    cells: int = 400,
    vocab: int = 1083,
) -> float:
    """Thread CPU milliseconds of one decode step (:func:`~pix2seq.model.transformer.decoder_step`
    and the output projection) of a decoder of this shape (default: COCO's) at ``rows`` rows, in
    float32 or under bf16 autocast, ``filled`` positions already cached; the mean of ``steps``
    after a warm-up, random weights."""
    from pix2seq.model.transformer import Decoder, StepCache, decoder_step

    g = torch.Generator().manual_seed(0)
    decoder = Decoder(layers, d_model, heads, mlp_dim).eval()
    head = (torch.randn(vocab, d_model, generator=g) * 0.02, torch.zeros(vocab))
    memory = torch.randn(rows, cells, d_model, generator=g)
    x = torch.randn(rows, d_model, generator=g)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with torch.inference_mode(), amp:
        cache = StepCache(decoder, memory, filled + steps + 1, dtype, project=True, head=head)
        cache.k.zero_()  # the positions "already cached" hold finite values
        cache.v.zero_()
        cache.pos = filled
        cache.logits(decoder_step(x, cache))  # warm-up: oneDNN builds its kernels
        t = time.thread_time()
        for _ in range(steps):
            cache.logits(decoder_step(x, cache))
        return (time.thread_time() - t) / steps * 1e3


__all__ = [
    "AMP_MODES",
    "STEP_ROWS",
    "Choice",
    "autocast_dtype",
    "choose",
    "cpu_has_bf16",
    "measure",
    "use_channels_last",
]
