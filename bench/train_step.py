"""Training throughput and the split of a step: data wait, forward, backward, optimizer; peak memory;
and the loader's own throughput on the same config (the loader must never be the bottleneck).

Presets (``--preset``):

- ``coco``: the COCO config, ResNet-50 C5, 6+6 layers, d 256, 640 px, 100 instances (500 tokens),
  1000 bins, 80 classes, LSJ; batch 1 x 2 repetition = 2 samples per step (a few steps on CPU);
- ``demo``: params.yaml as it stands (resnet18 layer3, 2+2, d 256, 128 px, batch 16 x repeat 2).

Both train on a generated COCO-format dataset (cached under --data-dir) through the real training
DataLoader (``build_loader``: repetition sampler, --workers workers, collate). A step is what
``pix2seq.engine.train_one_epoch`` does: forward under autocast (``train.amp``: auto = bf16, off =
float32), the weighted sequence loss, backward, grad-norm clipping, AdamW
(``pix2seq.optim.build_optimizer``: the seed's parameter groups; fused on CUDA and CPU), zero_grad and
the schedule. Each phase is timed on the host; on CUDA the device is synchronised at the phase
boundaries (which costs a little throughput, so the GPU benchmark's images/s comes from
unsynchronised steps).

Data wait is the time ``next(loader)`` blocks in the training loop. Separately, before training,
the loader alone is timed (bench/loader_throughput.py's :func:`measure_loader`) with the same
config and workers, and compared with the samples/s the training step consumes.

Peak memory: CPU, the peak RSS sampled every 20 ms during the timed steps (this process; the
DataLoader workers summed separately) and the process's lifetime ``ru_maxrss``; CUDA,
``torch.cuda.max_memory_allocated``.

    .venv/bin/python bench/train_step.py --preset coco --json
    .venv/bin/python bench/train_step.py --preset demo --amp bf16,off --steps 10
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/train_step.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    ROOT,
    PeakRSS,
    add_common_args,
    emit,
    log,
    machine_info,
    maxrss_mb,
    now,
    rnd,
    setup,
    sync,
)
from bench.loader_throughput import DEFAULT_DATA_DIR, ensure_dataset, measure_loader  # noqa: E402

PHASES = ("data_wait", "h2d", "forward", "backward", "optimizer")
PRESET_STEPS = {"coco": (1, 3), "demo": (1, 6)}  # (warmup, timed)


def coco_overrides(workers: int) -> dict:
    return {
        "data": {"image_size": 640, "augment": "lsj", "num_workers": workers},
        "tokenizer": {"bins": 1000, "max_instances": 100},
        "model": {
            "backbone": "resnet50",
            "backbone_stage": "layer4",
            "d_model": 256,
            "encoder_layers": 6,
            "decoder_layers": 6,
            "heads": 8,
            "mlp_dim": 1024,
        },
        "train": {"batch_size": 1, "batch_repeat": 2},
    }


def build_config(args: argparse.Namespace):
    """``(cfg, vocab, dataset_info)`` for the preset, with the generated dataset in place."""
    import yaml

    from pix2seq.config import config_from_dict
    from pix2seq.data.dataset import build_vocab
    from pix2seq.vocab import Vocab

    if args.preset == "coco":
        values = coco_overrides(args.workers)
        root, prepared, setup_s = ensure_dataset(640, args.num_images, args.data_dir)
        num_classes = 80  # the COCO vocabulary (the generated data uses the first 10 labels)
    else:
        values = yaml.safe_load(Path(args.params).read_text())
        g = values.get("data", {}).get("generated", {})
        size = int(g.get("image_size", 128))
        root, prepared, setup_s = ensure_dataset(
            size,
            args.num_images,
            args.data_dir,
            num_classes=int(g.get("num_classes", 4)),
            max_objects=int(g.get("max_objects", 6)),
            min_object_size=g.get("min_object_size"),
            max_object_size=g.get("max_object_size"),
        )
        values.setdefault("data", {})["num_workers"] = args.workers
        num_classes = None
    values.setdefault("data", {}).update(
        {"source": "generated", "root": str(root), "prepared_dir": str(prepared)}
    )
    cfg = config_from_dict(values, overrides=list(args.set or []))
    vocab = (
        Vocab(num_classes, cfg.tokenizer.bins, cfg.tokenizer.vocab_size) if num_classes else build_vocab(cfg)
    )
    return cfg, vocab, {"root": str(root), "num_images": args.num_images, "setup_s": rnd(setup_s, 1)}


def config_summary(cfg, vocab) -> dict:
    m, d, t, k = cfg.model, cfg.data, cfg.train, cfg.tokenizer
    return {
        "backbone": m.backbone,
        "stage": m.backbone_stage,
        "encoder_layers": m.encoder_layers,
        "decoder_layers": m.decoder_layers,
        "d_model": m.d_model,
        "heads": m.heads,
        "mlp_dim": m.mlp_dim,
        "dropout": m.dropout,
        "drop_path": m.drop_path,
        "image_size": d.image_size,
        "augment": d.augment,
        "batch_size": t.batch_size,
        "batch_repeat": t.batch_repeat,
        "samples_per_step": t.batch_size * t.batch_repeat,
        "max_instances": k.max_instances,
        "sequence_length": 5 * k.max_instances + 1,
        "bins": k.bins,
        "vocab_size": vocab.vocab_size,
        "workers": d.num_workers,
        "grad_clip": t.grad_clip,
        "prefetch_batches": d.num_workers * 4,
    }


def amp_dtype(name: str):
    """bf16 | auto -> bf16 autocast; off | fp32 -> None (float32)."""
    import torch

    from pix2seq.precision import autocast_dtype

    return autocast_dtype("off" if name in ("off", "fp32") else "bf16", torch.device("cpu"))


def train_step(
    model, criterion, optimizer, batch, amp, device, grad_clip: float, schedule=None, timed: bool = True
) -> dict:
    """One optimizer step as the engine takes it (no accumulation), phase by phase.

    Returns seconds per phase (``h2d``, ``forward``, ``backward``, ``optimizer``) and the loss."""
    import contextlib

    import torch

    from pix2seq.engine import move_batch

    dev = torch.device(device)
    ctx = torch.autocast(device_type=dev.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    tick = (lambda: (sync(dev), now())[1]) if timed else now
    t0 = tick()
    batch = move_batch(batch, dev)
    t1 = tick()
    with ctx:
        logits = model(batch["image"], batch["input_tokens"])
    loss = criterion(logits.float(), batch["target_tokens"], batch["token_weights"])
    t2 = tick()
    loss.backward()
    t3 = tick()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if schedule is not None:
        schedule.step()
    t4 = tick()
    return {
        "h2d": t1 - t0,
        "forward": t2 - t1,
        "backward": t3 - t2,
        "optimizer": t4 - t3,
        "loss": loss.detach(),
    }


def _batches(loader):
    """Endless batches from the training loader, epoch after epoch."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def bench_amp(cfg, vocab, amp_name: str, batches, args) -> dict:
    import torch

    from pix2seq.model import build_model
    from pix2seq.optim import build_optimizer, build_schedule

    device = torch.device(args.device)
    torch.manual_seed(cfg.seed)
    model, criterion = build_model(cfg, vocab)
    model.to(device).train()
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.train, device)
    schedule = build_schedule(optimizer, cfg.train, steps_per_epoch=1000)
    amp = amp_dtype(amp_name)
    warmup, steps = args.warmup, args.steps
    rows = []
    losses = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem:
        for i in range(warmup + steps):
            t = now()
            batch = next(batches)
            wait = now() - t
            r = train_step(model, criterion, optimizer, batch, amp, device, cfg.train.grad_clip, schedule)
            r["data_wait"] = wait
            r["samples"] = batch["image"].shape[0]
            losses.append(float(r.pop("loss")))
            if i >= warmup:
                rows.append(r)
            log(
                f"  {args.preset} {amp_name} step {i + 1}/{warmup + steps}"
                f"{' (warmup)' if i < warmup else ''}: " + ", ".join(f"{p} {r[p]:.2f}s" for p in PHASES)
            )
    step_s = [sum(r[p] for p in PHASES) for r in rows]
    samples = rows[0]["samples"]
    med = statistics.median(step_s)
    split = {p: rnd(statistics.median(r[p] for r in rows) * 1e3, 1) for p in PHASES}
    total_ms = sum(split.values()) or 1.0
    out = {
        "amp": "bf16" if amp is not None else "fp32",
        "warmup_steps": warmup,
        "steps": steps,
        "samples_per_step": samples,
        "step_s": {"median": rnd(med), "best": rnd(min(step_s)), "all": [rnd(s) for s in step_s]},
        "images_per_s": rnd(samples / med),
        "distinct_images_per_s": rnd(samples / med / cfg.train.batch_repeat),
        "split_ms": split,
        "split_fraction": {p: rnd(v / total_ms) for p, v in split.items()},
        "data_wait_ms_mean": rnd(statistics.fmean(r["data_wait"] for r in rows) * 1e3, 2),
        "data_wait_ms_max": rnd(max(r["data_wait"] for r in rows) * 1e3, 2),
        "losses": [rnd(x, 4) for x in losses],
        "losses_finite": all(x == x and abs(x) != float("inf") for x in losses),
        "peak_rss_mb": rnd(mem.peak_mb, 1),
        "workers_peak_rss_mb": rnd(mem.children_peak_mb, 1),
    }
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = rnd(torch.cuda.max_memory_allocated() / 2**20, 1)
    del model, optimizer, criterion
    gc.collect()
    return out


def run(args: argparse.Namespace) -> dict:
    import torch

    from pix2seq.data.dataset import build_loader

    w0, s0 = PRESET_STEPS[args.preset]
    args.warmup = w0 if args.warmup is None else args.warmup
    args.steps = s0 if args.steps is None else args.steps
    t_start = now()
    cfg, vocab, data_info = build_config(args)
    log(f"train_step: preset {args.preset}, dataset ready ({data_info['setup_s']}s)")

    loader_info = None
    if args.loader_batches > 0:
        # the loader alone, same config and workers, before training starts (nothing competes)
        lo = build_loader(cfg, cfg.data.train_split, train=True, vocab=vocab)
        m = measure_loader(lo, warmup=min(2, args.loader_batches), batches=args.loader_batches)
        del lo
        gc.collect()
        loader_info = {
            "samples_per_s": rnd(m["samples_per_s"], 2),
            "batches_timed": args.loader_batches,
            "batch": cfg.train.batch_size * cfg.train.batch_repeat,
            "workers": cfg.data.num_workers,
            "seconds": rnd(m["seconds"], 2),
            "source": "bench/loader_throughput.py:measure_loader",
        }
        log(f"  loader alone: {loader_info['samples_per_s']} samples/s")

    loader = build_loader(cfg, cfg.data.train_split, train=True, vocab=vocab)
    batches = _batches(loader)
    amps = {}
    for name in [a for a in str(args.amp).split(",") if a]:
        amps[name if name not in ("off", "auto") else {"off": "fp32", "auto": "bf16"}[name]] = bench_amp(
            cfg, vocab, name, batches, args
        )
    del batches, loader
    gc.collect()

    compare = {}
    for name, r in amps.items():
        train_rate = r["images_per_s"]
        step_ms = sum(r["split_ms"].values())
        c = {
            "train_samples_per_s": train_rate,
            "data_wait_ms_median": r["split_ms"]["data_wait"],
            "data_wait_fraction": rnd(r["split_ms"]["data_wait"] / step_ms if step_ms else 0.0, 4),
        }
        if loader_info:
            c["loader_samples_per_s"] = loader_info["samples_per_s"]
            c["loader_headroom"] = rnd(loader_info["samples_per_s"] / train_rate, 2) if train_rate else None
            c["loader_is_bottleneck"] = bool(
                c["loader_headroom"] is not None
                and c["loader_headroom"] < 1.2
                or c["data_wait_fraction"] > 0.05
            )
        compare[name] = c
    return {
        "benchmark": "train_step",
        "preset": args.preset,
        "machine": machine_info(torch.get_num_threads()),
        "device": args.device,
        "config": config_summary(cfg, vocab),
        "dataset": data_info,
        "loader": loader_info,
        "amp": amps,
        "loader_vs_train": compare,
        "maxrss_mb": rnd(maxrss_mb(), 1),
        "seconds": rnd(now() - t_start, 1),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--preset", default="coco", choices=["coco", "demo"])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="the demo preset's params file")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument(
        "--amp", default="bf16", help="comma list of bf16 | off (fp32) | auto (the engine's default)"
    )
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (preset default)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (preset default)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--num-images", type=int, default=256, help="generated training images")
    ap.add_argument(
        "--loader-batches", type=int, default=12, help="batches of the loader-alone timing (0: skip)"
    )
    ap.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    ap.add_argument("--device", default="cpu")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup(args)
    result = run(args)
    emit(result, args)
    for name, r in result["amp"].items():
        log(
            f"train {args.preset} {name}: {r['images_per_s']} samples/s, step {r['step_s']['median']}s, "
            f"split ms {r['split_ms']}, peak RSS {r['peak_rss_mb']} MiB; loader {result['loader_vs_train'][name]}"
        )
    return 0 if all(r["losses_finite"] for r in result["amp"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
