"""Shared helpers of the benchmark modules: CLI options, machine info, JSON output, peak memory,
the decoding model (COCO shape, random weights rescaled so greedy decoding is not constant) and
synthetic images.

Threads: on a shared 2-core machine, two intra-op threads plus any other busy process make every
parallel op wait for a descheduled sibling (measured 10-40x slower), so every module takes
``--threads`` (default 1) and records it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"


# ----------------------------------------------------------------------------------------- CLI


def add_common_args(ap: argparse.ArgumentParser, threads: int = 1) -> None:
    ap.add_argument(
        "--threads",
        type=int,
        default=threads,
        help="torch intra-op threads (default %(default)s: stable on a busy shared machine)",
    )
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ap.add_argument("--json-out", default=None, help="also write the JSON result to this file")


def setup(args: argparse.Namespace) -> None:
    """Threads and warnings, before any timing."""
    import torch

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*TorchCodec.*")
    if args.threads > 0:
        torch.set_num_threads(args.threads)


def emit(result: dict[str, Any], args: argparse.Namespace) -> None:
    text = json.dumps(result, default=_jsonable)
    if getattr(args, "json_out", None):
        p = Path(args.json_out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(result, indent=1, default=_jsonable) + "\n")
    if getattr(args, "json", False):
        print(text)


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the JSON)."""
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int | None = None) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.is_available(),
        "gpu_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    return info


# ---------------------------------------------------------------------------------- timing


def sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def summary(times: list[float]) -> dict[str, Any]:
    """best / median / all of a list of seconds."""
    return {
        "best_s": round(min(times), 4),
        "median_s": round(statistics.median(times), 4),
        "runs_s": [round(t, 4) for t in times],
    }


def rnd(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


class PeakRSS:
    """Peak resident memory (MiB) of this process, and of its children (DataLoader workers) summed,
    sampled every ``interval`` seconds by a thread while the context is open."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self.children_peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while True:
            try:
                rss = me.memory_info().rss
                kids = 0
                for c in me.children(recursive=True):
                    try:
                        kids += c.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_mb = max(self.peak_mb, rss / 2**20)
                self.children_peak_mb = max(self.children_peak_mb, kids / 2**20)
            except Exception:  # noqa: BLE001 - sampling must never break a benchmark
                pass
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def maxrss_mb() -> float:
    """Lifetime peak RSS of this process (``getrusage``; KiB on Linux)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


# ------------------------------------------------------------------------------ model / inputs

COCO_MODEL = {
    "backbone": "resnet50",
    "stage": "layer4",
    "d_model": 256,
    "encoder_layers": 6,
    "decoder_layers": 6,
    "heads": 8,
    "mlp_dim": 1024,
    "num_classes": 80,
    "bins": 1000,
    "num_objects": 100,
    "image_size": 640,
}


def add_model_args(ap: argparse.ArgumentParser, **defaults: Any) -> None:
    """The model-shape options (COCO shape by default)."""
    d = {**COCO_MODEL, **defaults}
    ap.add_argument("--backbone", default=d["backbone"])
    ap.add_argument("--stage", default=d["stage"], choices=["layer3", "layer4"])
    ap.add_argument("--d-model", type=int, default=d["d_model"])
    ap.add_argument("--encoder-layers", type=int, default=d["encoder_layers"])
    ap.add_argument("--decoder-layers", type=int, default=d["decoder_layers"])
    ap.add_argument("--heads", type=int, default=d["heads"])
    ap.add_argument("--mlp-dim", type=int, default=d["mlp_dim"])
    ap.add_argument("--num-classes", type=int, default=d["num_classes"])
    ap.add_argument("--bins", type=int, default=d["bins"])
    ap.add_argument("--num-objects", type=int, default=d["num_objects"], help="max_instances (5 tokens each)")
    ap.add_argument("--image-size", type=int, default=d["image_size"])


def model_shape(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "backbone": args.backbone,
        "stage": args.stage,
        "d_model": args.d_model,
        "encoder_layers": args.encoder_layers,
        "decoder_layers": args.decoder_layers,
        "heads": args.heads,
        "mlp_dim": args.mlp_dim,
        "num_classes": args.num_classes,
        "bins": args.bins,
        "num_objects": args.num_objects,
        "generated_tokens": 5 * args.num_objects,
        "image_size": args.image_size,
    }


def build_decoding_model(args: argparse.Namespace, seed: int = 0, rescale: bool = True):
    """``(model, vocab)`` of the requested shape, random weights, eval mode, on CPU."""
    import torch

    from pix2seq.config import Config, ModelConfig
    from pix2seq.model import build_model
    from pix2seq.vocab import Vocab

    torch.manual_seed(seed)
    cfg = Config()
    cfg.model = ModelConfig(
        backbone=args.backbone,
        backbone_stage=args.stage,
        d_model=args.d_model,
        encoder_layers=args.encoder_layers,
        decoder_layers=args.decoder_layers,
        heads=args.heads,
        mlp_dim=args.mlp_dim,
    )
    cfg.tokenizer.bins = args.bins
    cfg.tokenizer.max_instances = args.num_objects
    vocab = Vocab(args.num_classes, args.bins)
    model, _ = build_model(cfg, vocab)
    if rescale:
        rescale_for_decoding(model, seed)
    model.eval()
    return model, vocab


def rescale_for_decoding(model, seed: int = 0) -> None:
    """Re-draw the transformer's weights at PyTorch-default scale (unit-variance activations), with a
    small output embedding and unit-variance positions (as tests/test_decoding.py does).

    Freshly initialised weights (std 0.02) give near-uniform logits and a decoder that repeats one
    token, which would make "identical outputs" vacuous; with these the tokens depend on the
    position, the prefix and the image (the benchmark checks and records it)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("backbone"):
                m.weight.normal_(0.0, m.in_features**-0.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
        model.token_embed.weight.normal_(0.0, 0.1, generator=g)
        model.pos_embed.normal_(0.0, 1.0, generator=g)
        model.out_bias.normal_(0.0, 0.05, generator=g)


def synthetic_images(n: int, size: int, seed: int = 0):
    """``(n, 3, size, size)`` uint8: smooth random colour fields of varied brightness plus a little
    noise (i.i.d. noise alone gives nearly identical image features after a random ResNet)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        cells = int(torch.randint(2, 17, (1,), generator=g))
        low = torch.rand(1, 3, cells, cells, generator=g)
        x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[0]
        x = x * (0.3 + 1.2 * torch.rand(1, generator=g)) + 0.1 * torch.rand(3, size, size, generator=g)
        out.append((x.clamp(0, 1) * 255).to(torch.uint8))
    return torch.stack(out)


def token_diversity(tokens, class_every: int = 5) -> dict[str, Any]:
    """How far greedy outputs are from constant: distinct coordinate tokens (overall, per row) and
    the fraction of positions where two images' sequences differ."""
    import torch

    if tokens.numel() == 0:
        return {"distinct_coord_tokens": 0, "min_distinct_per_row": 0, "rows_differ_fraction": 0.0}
    pos = [i for i in range(tokens.shape[1]) if i % class_every != class_every - 1]
    coords = tokens[:, pos]
    per_row = [len(set(r.tolist())) for r in coords]
    differ = 0.0
    if tokens.shape[0] > 1:
        differ = float((tokens[1:] != tokens[:1]).float().mean())
    return {
        "distinct_coord_tokens": len(set(coords.flatten().tolist())),
        "min_distinct_per_row": min(per_row),
        "distinct_class_tokens": len(set(tokens[:, class_every - 1 :: class_every].flatten().tolist())),
        "rows_differ_fraction": round(differ, 3),
        "non_constant": bool(min(per_row) >= 3 and torch.is_tensor(tokens)),
    }


def now() -> float:
    return time.perf_counter()
