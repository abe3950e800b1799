"""Training-loader throughput: decoded + augmented + tokenised samples per second.

Builds (once, cached under --data-dir) a generated COCO-format dataset of --source-size px JPEGs,
prepares it, then times the real training DataLoader (``pix2seq.data.dataset.build_loader``:
RepeatSampler, workers, collate) at canvas --image-size with --augment.

    .venv/bin/python bench/loader_throughput.py                       # 640 px, lsj, 2 workers
    .venv/bin/python bench/loader_throughput.py --workers 4 --augment detr --json

Prints a human line and, with --json, one JSON object (for the benchmark suite). The pieces are
reusable: :func:`ensure_dataset` (the cached generated dataset) and :func:`measure_loader` (the
timing loop), which bench/train_step.py uses to compare the loader with the training step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA_DIR = os.path.join(tempfile.gettempdir(), "pix2seq-bench-loader")


def ensure_dataset(
    source_size: int,
    num_images: int,
    data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR,
    num_classes: int = 10,
    max_objects: int = 12,
    min_object_size: int | None = None,
    max_object_size: int | None = None,
) -> tuple[Path, Path, float]:
    """``(root, prepared_dir, seconds)`` of a generated + prepared dataset (built once, then cached:
    generation and preparation are idempotent)."""
    from pix2seq.config import GeneratedDataConfig, PrepareConfig
    from pix2seq.data.prepare import prepare_dataset
    from pix2seq.data.synthetic import write_generated_dataset

    base = Path(data_dir) / f"gen{source_size}-n{num_images}"
    if num_classes != 10 or max_objects != 12:
        base = base.with_name(base.name + f"-c{num_classes}-o{max_objects}")
    root, prepared = base / "data", base / "prepared"
    gcfg = GeneratedDataConfig(
        image_size=source_size,
        num_train=num_images,
        num_val=1,
        num_classes=num_classes,
        min_objects=1,
        max_objects=max_objects,
        min_object_size=min_object_size or max(2, source_size // 40),
        max_object_size=max_object_size or source_size // 3,
    )
    t0 = time.perf_counter()
    write_generated_dataset(gcfg, root)
    prepare_dataset(root, ["train2017", "val2017"], prepared, None, PrepareConfig(), progress=False)
    return root, prepared, time.perf_counter() - t0


def measure_loader(loader, warmup: int, batches: int) -> dict:
    """Iterate ``loader`` (across epochs when needed): ``warmup`` batches untimed, then ``batches``
    timed. Returns samples, seconds and samples/s."""
    need = warmup + batches
    samples = 0
    epoch = 0
    t_start = time.perf_counter() if warmup <= 0 else None
    n = 0
    while n < need:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for batch in loader:
            n += 1
            if n == warmup:
                t_start = time.perf_counter()
            elif n > warmup:
                samples += batch["image"].shape[0]
            if n >= need:
                break
        epoch += 1
    elapsed = time.perf_counter() - (t_start or time.perf_counter())
    rate = samples / elapsed if elapsed > 0 else float("nan")
    return {"samples": samples, "seconds": elapsed, "samples_per_s": rate}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=640, help="canvas side (data.image_size)")
    ap.add_argument("--source-size", type=int, default=640, help="side of the generated JPEGs")
    ap.add_argument("--num-images", type=int, default=256, help="generated training images")
    ap.add_argument("--augment", default="lsj", choices=["lsj", "detr", "none"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8, help="distinct images per batch (train.batch_size)")
    ap.add_argument("--repeat", type=int, default=2, help="train.batch_repeat")
    ap.add_argument("--max-instances", type=int, default=100)
    ap.add_argument("--bins", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=3, help="batches not timed")
    ap.add_argument("--batches", type=int, default=30, help="batches timed")
    ap.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import torch

    from pix2seq.config import config_from_dict
    from pix2seq.data.dataset import build_loader, build_vocab

    root, prepared, setup_s = ensure_dataset(args.source_size, args.num_images, args.data_dir)

    cfg = config_from_dict(
        {
            "data": {
                "root": str(root),
                "prepared_dir": str(prepared),
                "image_size": args.image_size,
                "augment": args.augment,
                "num_workers": args.workers,
                "detr_scales": [round(args.image_size * f) for f in (0.75, 0.8, 0.85, 0.9, 0.95, 1.0)],
            },
            "tokenizer": {"bins": args.bins, "max_instances": args.max_instances},
            "train": {"batch_size": args.batch_size, "batch_repeat": args.repeat},
        }
    )
    vocab = build_vocab(cfg)
    loader = build_loader(cfg, cfg.data.train_split, train=True, vocab=vocab)
    per_batch = loader.batch_size
    rate = measure_loader(loader, args.warmup, args.batches)["samples_per_s"]
    result = {
        "metric": "loader_samples_per_s",
        "value": round(rate, 2),
        "unique_images_per_s": round(rate / args.repeat, 2),
        "image_size": args.image_size,
        "source_size": args.source_size,
        "augment": args.augment,
        "workers": args.workers,
        "batch": per_batch,
        "batches_timed": args.batches,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "setup_s": round(setup_s, 1),
    }
    print(
        f"loader throughput: {rate:.1f} samples/s ({rate / args.repeat:.1f} distinct images/s x{args.repeat} "
        f"repetition) at {args.image_size}px {args.augment}, {args.workers} workers, batch {per_batch}, "
        f"{os.cpu_count()} CPUs"
    )
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
