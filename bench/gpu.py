"""GPU benchmark: COCO-config training images/s and MFU, evaluation images/s at batch 32.

Runs only where CUDA is available (elsewhere it prints "no GPU" and, with --json, ``{"gpu": null}``):

    python bench/gpu.py --out bench/results/          # writes bench/results/<device-name>.json

Training (the COCO config: ResNet-50 C5, 6+6 layers, d 256, 640 px, 500-token sequences, 80
classes, 1000 bins; random weights and synthetic batches already on the device, so the loader is
excluded) under bf16 autocast with fused AdamW (``pix2seq.optim.build_optimizer``,
``train.fused_adamw``), one row per variant:

- ``eager``          NCHW, eager;
- ``channels_last``  the model and the images in channels_last (``train.channels_last``);
- ``compile``        channels_last + ``torch.compile(model)`` (``train.compile``).

Step time is the mean of --steps unsynchronised steps (one synchronisation at each end); the
phase split (forward, backward, optimizer) comes from two extra steps synchronised at the phase
boundaries. FLOPs per step (forward + backward) are counted once with
:class:`torch.utils.flop_counter.FlopCounterMode` on the eager model, and
``MFU = FLOPs / step time / peak dense bf16 FLOP/s`` of the device (table below, keyed by
``torch.cuda.get_device_name()``; ``--peak-tflops`` overrides). Peak memory is
``torch.cuda.max_memory_allocated``.

Evaluation: ``generate()`` greedy with the full cache, bf16 autocast, the model channels-last,
batch 32, 640 px, 100 objects (500 tokens), with the step evaluation runs on CUDA (``eval.step:
auto``: the static step captured as a CUDA graph, built once, its capture time reported): images/s
for the whole call (encoder included). Then, at batch 1 and 32 (bench/decode.py's
:func:`bench_batch`): the three caches (recompute time-capped), and the full cache's step as a
CUDA graph, eager (no graph) and ``torch.compile``d (then captured), decode-only, with the step
table (ms per step, FLOPs, bytes, against the device's measured GEMM peak and bandwidth) and the
outputs' equality recorded.

``--allow-cpu`` runs the same code on the CPU (for the smoke test, with tiny ``--set`` shapes).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/gpu.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    RESULTS_DIR,
    add_common_args,
    emit,
    log,
    machine_info,
    now,
    rescale_for_decoding,
    rnd,
    setup,
    summary,
    sync,
    synthetic_images,
)

# Peak dense (no sparsity) bf16 tensor-core FLOP/s, by a substring of torch.cuda.get_device_name();
# the first match wins, so specific names come before general ones.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
)
VARIANTS = ("eager", "channels_last", "compile")


def peak_flops(name: str | None, override_tflops: float | None = None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if name:
        for key, value in PEAK_BF16_FLOPS:
            if key.lower() in name.lower():
                return value, f"table: {key}"
    return None, "unknown device: pass --peak-tflops"


def device_file_name(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``NVIDIA-H100-80GB-HBM3``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "device"


def build_cfg(args: argparse.Namespace):
    from bench.train_step import coco_overrides
    from pix2seq.config import config_from_dict
    from pix2seq.vocab import Vocab

    values = coco_overrides(workers=0)
    values["data"]["image_size"] = args.image_size
    values["tokenizer"]["max_instances"] = args.num_objects
    values["train"].update({"fused_adamw": True, "amp": "bf16"})
    cfg = config_from_dict(values, overrides=list(args.set or []))
    return cfg, Vocab(args.num_classes, cfg.tokenizer.bins)


def synthetic_batch(cfg, vocab, batch: int, device, channels_last: bool, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    s, t = cfg.data.image_size, 5 * cfg.tokenizer.max_instances + 1
    images = synthetic_images(batch, s, seed)
    tokens = torch.randint(vocab.class_token_ids[0], vocab.coord_end, (batch, t + 1), generator=g)
    out = {
        "image": images,
        "input_tokens": tokens[:, :-1].clone(),
        "target_tokens": tokens[:, 1:].clone(),
        "token_weights": torch.ones(batch, t),
    }
    out = {k: v.to(device) for k, v in out.items()}
    if channels_last:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def count_flops(model, criterion, batch, amp) -> float:
    """FLOPs of one forward + loss + backward (FlopCounterMode; the optimizer's are negligible)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    dev = batch["image"].device.type
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(device_type=dev, dtype=amp):
            logits = model(batch["image"], batch["input_tokens"])
        loss = criterion(logits.float(), batch["target_tokens"], batch["token_weights"])
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def bench_train_variant(variant: str, cfg, vocab, args, flops: float | None, peak: float | None) -> dict:
    import torch

    from bench.train_step import train_step
    from pix2seq.model import build_model
    from pix2seq.optim import build_optimizer

    device = torch.device(args.device)
    channels_last = variant in ("channels_last", "compile")
    torch.manual_seed(cfg.seed)
    model, criterion = build_model(cfg, vocab)
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.train, device)
    fused = bool(optimizer.defaults.get("fused"))
    fn = torch.compile(model) if variant == "compile" else model
    batch = synthetic_batch(cfg, vocab, args.batch, device, channels_last)
    amp = torch.bfloat16
    clip = cfg.train.grad_clip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = now()
    for _ in range(args.warmup + (3 if variant == "compile" else 0)):
        train_step(fn, criterion, optimizer, batch, amp, device, clip, timed=False)
    sync(device)
    warmup_s = now() - t
    t = now()
    losses = []
    for _ in range(args.steps):
        r = train_step(fn, criterion, optimizer, batch, amp, device, clip, timed=False)
        losses.append(r["loss"])
    sync(device)
    step_s = (now() - t) / args.steps
    split = [train_step(fn, criterion, optimizer, batch, amp, device, clip, timed=True) for _ in range(2)]
    losses = [float(x) for x in losses]
    out = {
        "variant": variant,
        "bf16_autocast": True,
        "fused_adamw": fused,
        "channels_last": channels_last,
        "compiled": variant == "compile",
        "batch": args.batch,
        "steps": args.steps,
        "warmup_s": rnd(warmup_s, 2),
        "step_s": rnd(step_s, 5),
        "images_per_s": rnd(args.batch / step_s, 2),
        "split_ms": {
            p: rnd(statistics.median(s[p] for s in split) * 1e3, 2)
            for p in ("forward", "backward", "optimizer")
        },
        "losses_finite": all(x == x and abs(x) != float("inf") for x in losses),
    }
    if flops:
        out["tflops_per_s"] = rnd(flops / step_s / 1e12, 2)
        out["mfu"] = rnd(flops / step_s / peak, 4) if peak else None
    if device.type == "cuda":
        out["max_memory_allocated_mb"] = rnd(torch.cuda.max_memory_allocated() / 2**20, 1)
    del model, optimizer, fn
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def decode_shape(cfg, args) -> dict:
    """The model shape bench/decode.py's step costs are computed from."""
    m = cfg.model
    return {
        "backbone": m.backbone,
        "stage": m.backbone_stage,
        "d_model": m.d_model,
        "encoder_layers": m.encoder_layers,
        "decoder_layers": m.decoder_layers,
        "heads": m.heads,
        "mlp_dim": m.mlp_dim,
        "num_classes": args.num_classes,
        "bins": cfg.tokenizer.bins,
        "num_objects": cfg.tokenizer.max_instances,
        "generated_tokens": 5 * cfg.tokenizer.max_instances,
        "image_size": cfg.data.image_size,
    }


def bench_eval(cfg, vocab, args) -> dict:
    """Evaluation images/s at ``--eval-batch`` (bf16, full cache, the step ``eval.step: auto`` runs
    here: a CUDA graph), then the step with and without CUDA graphs (and compiled) and the three
    cache designs, at batch 1 and ``--eval-batch`` (bench/decode.py's :func:`bench_batch`)."""
    import torch

    from bench import decode as decode_bench
    from pix2seq.decoding import generate
    from pix2seq.model import build_model

    device = torch.device(args.device)
    torch.manual_seed(cfg.seed)
    model, _ = build_model(cfg, vocab)
    rescale_for_decoding(model, cfg.seed)
    model.to(device).eval()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)  # what evaluation does with bf16 on CUDA
    b, n = args.eval_batch, cfg.tokenizer.max_instances
    images = synthetic_images(b, cfg.data.image_size, seed=1).to(device)
    amp = torch.bfloat16
    first = generate(model, images, vocab, n, autocast_dtype=amp)  # warm-up; builds the step
    times = []
    for _ in range(args.eval_repeats):
        sync(device)
        t = now()
        generate(model, images, vocab, n, method="greedy", cache="full", autocast_dtype=amp)
        sync(device)
        times.append(now() - t)
    s = summary(times)
    out = {
        "batch": b,
        "num_objects": n,
        "tokens": 5 * n,
        "dtype": "bf16 autocast",
        "cache": "full",
        "step": "auto",
        "step_compile_s": rnd(first.compile_s, 2),
        **s,
        "images_per_s": rnd(b / s["best_s"], 2),
        "ms_per_token": rnd(s["best_s"] / (5 * n) * 1e3, 3),
    }
    if args.compare_caches:
        ns = argparse.Namespace(
            num_objects=n,
            device=args.device,
            repeats=2,
            repeats_batched=2,
            cap_s=args.cap_s,
            cap_s_batched=args.cap_s,
            cap_s_self=args.cap_s,
            recompute_decode_only="derive",
            batched_whole="run",
            step_variants=args.step_variants,
            step_batches={1, b},
            shape=decode_shape(cfg, args),
            clock="wall",
        )
        per_batch = {
            str(x): decode_bench.bench_batch(model, vocab, images[:x], ns, amp, fp32=False) for x in (1, b)
        }
        out["caches"] = per_batch[str(b)]
        out["caches_batch1"] = per_batch["1"]
        out["peaks"] = decode_bench.machine_peaks("bf16", args.device)
        out["steps"] = decode_bench.step_table(per_batch, out["peaks"], batches=("1", str(b)))
    del model
    return out


def run(args: argparse.Namespace) -> dict | None:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return None
    if args.device != "cuda" and not args.allow_cpu:
        return None
    cfg, vocab = build_cfg(args)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({machine_info()['cpu_model']})"
    peak, peak_source = peak_flops(name if args.device == "cuda" else None, args.peak_tflops)
    t0 = now()
    log(f"gpu: {name}; peak bf16 {peak and peak / 1e12} TFLOP/s ({peak_source})")

    # FLOPs of one training step, counted on the eager model
    from pix2seq.model import build_model

    torch.manual_seed(cfg.seed)
    m, crit = build_model(cfg, vocab)
    m.to(args.device).train()
    flops = count_flops(m, crit, synthetic_batch(cfg, vocab, args.batch, args.device, False), torch.bfloat16)
    del m
    log(f"  {flops / 1e12:.2f} TFLOP per training step (batch {args.batch})")

    train = {}
    for v in [x for x in args.variants.split(",") if x]:
        try:
            train[v] = bench_train_variant(v, cfg, vocab, args, flops, peak)
            log(f"  train {v}: {train[v]['images_per_s']} images/s, MFU {train[v].get('mfu')}")
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile unavailable: record, go on
            train[v] = {"variant": v, "error": f"{type(e).__name__}: {e}"[:500]}
            log(f"  train {v}: FAILED {train[v]['error']}")
    ok = [r for r in train.values() if "images_per_s" in r]
    best = max(ok, key=lambda r: r["images_per_s"]) if ok else None
    evaluation = bench_eval(cfg, vocab, args) if args.eval_batch > 0 else None
    if evaluation:
        log(f"  eval batch {evaluation['batch']}: {evaluation['images_per_s']} images/s")
    m = cfg.model
    return {
        "benchmark": "gpu",
        "device": name,
        "machine": machine_info(torch.get_num_threads()),
        "cuda": torch.version.cuda,
        "peak_bf16_flops": peak,
        "peak_source": peak_source,
        "config": {
            "backbone": m.backbone,
            "stage": m.backbone_stage,
            "encoder_layers": m.encoder_layers,
            "decoder_layers": m.decoder_layers,
            "d_model": m.d_model,
            "image_size": cfg.data.image_size,
            "sequence_length": 5 * cfg.tokenizer.max_instances + 1,
            "vocab_size": vocab.vocab_size,
            "batch": args.batch,
            "inputs": "synthetic, on the device (the loader is excluded)",
        },
        "train_flops_per_step": flops,
        "train": train,
        "best_train_variant": best["variant"] if best else None,
        "train_images_per_s": best["images_per_s"] if best else None,
        "mfu": best.get("mfu") if best else None,
        "eval": evaluation,
        "seconds": rnd(now() - t0, 1),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, threads=0)
    ap.add_argument("--out", default=str(RESULTS_DIR), help="folder for <device-name>.json ('' : none)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU (smoke test of the code)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--image-size", type=int, default=640)
    ap.add_argument("--num-objects", type=int, default=100)
    ap.add_argument("--num-classes", type=int, default=80)
    ap.add_argument("--batch", type=int, default=16, help="training images per step")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--eval-batch", type=int, default=32, help="0: skip evaluation")
    ap.add_argument("--eval-repeats", type=int, default=3)
    ap.add_argument("--compare-caches", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument(
        "--step-variants", default="eager,compile", help="the step without CUDA graphs, compiled (decode.py)"
    )
    ap.add_argument("--cap-s", type=float, default=60.0, help="time cap of the recompute cache's call")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak dense bf16 TFLOP/s")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        args.allow_cpu = True
    setup(args)
    import torch

    if args.device == "cuda" and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    result = run(args)
    if result is None:
        print("gpu: no GPU (CUDA unavailable): GPU benchmarks skipped", file=sys.stderr)
        emit({"gpu": None, "reason": "no CUDA device"}, args)
        return 0
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{device_file_name(result['device'])}.json"
        emit(result, argparse.Namespace(json=False, json_out=str(path)))
        result["written_to"] = str(path)
        log(f"gpu: wrote {path}")
    emit({"gpu": result}, args)
    return 0 if all(r.get("losses_finite", True) for r in result["train"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
