"""Decoding throughput, images/s: full-prefix recompute vs self-attention cache vs full cache.

Spec section 5. Same weights, same images, one process, greedy decoding of ``5 * num_objects``
tokens with the COCO model shape (ResNet-50 C5, 6+6 layers, d 256, 100 objects = 500 tokens,
80 classes, 1000 bins, 640 px) at batch 1 and 16:

- (a) ``recompute``       ``cache="none"``: the whole prefix re-run every step (the seed's design);
- (b) ``selfattn_cache``  ``cache="self"``: self-attention K/V cached, the image memory's
  cross-attention K/V re-projected every step (Pretrained-Pix2Seq's design);
- (c) ``full_cache``      ``cache="full"``: ours, cross-attention K/V projected once per image.

Each variant is timed for the whole :func:`pix2seq.decoding.generate` call (encoder included; the
headline ratios) and decode-only (``memory=``, the encoder skipped). Variants are interleaved
round by round and the best of the repeats is kept. At batch 1 every whole call is run as such.
At larger batches the encoder (16 images at 640 px: ~20 s on one core) is timed once and the
whole call is composed as encoder + decode-only (labelled ``composed``; ``--batched-whole run``
runs ``generate(images)`` for every variant instead), which halves the suite's time. (a) is O(n^2) and runs once per batch size
under a time cap: when the cap stops it, the per-step times measured so far (a + b*t, fitted) are
extrapolated to the full length and the result is labelled ``extrapolated`` with the measured step
count and a lower bound (remaining steps at the median of the last measured ones). (a)'s
decode-only time is by default derived from that same call (its duration minus its encoder's,
timed inside the call; labelled), which saves a second O(n^2) run; ``--recompute-decode-only run``
runs it with ``memory=`` instead.

The greedy outputs of the three must be identical (tokens equal, class probabilities close; for a
capped (a), its measured prefix): recorded, and in float32 a mismatch fails the run (exit 1).
Random weights are rescaled (:func:`bench.common.rescale_for_decoding`) and the token diversity is
recorded, so "identical" is not vacuous.

    .venv/bin/python bench/decode.py --json                      # the COCO shape, batch 1 and 16
    .venv/bin/python bench/decode.py --batches 1 --num-objects 20 # quicker
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/decode.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    add_common_args,
    add_model_args,
    build_decoding_model,
    emit,
    log,
    machine_info,
    model_shape,
    now,
    rnd,
    setup,
    summary,
    sync,
    synthetic_images,
    token_diversity,
)

# (key in the report, generate(cache=...), description)
VARIANTS = (
    ("recompute", "none", "full-prefix recompute every step (seed)"),
    (
        "selfattn_cache",
        "self",
        "self-attn K/V cache, cross-attn K/V re-projected every step (Pretrained-Pix2Seq)",
    ),
    ("full_cache", "full", "self-attn K/V cache + cross-attn K/V projected once per image (ours)"),
)
TARGETS = {"speedup_vs_recompute": 10.0, "speedup_vs_selfattn_cache": 2.0}
MIN_MEASURED_STEPS = 3  # a capped call measures at least this many steps (something to extrapolate)


class _CapReached(Exception):
    pass


def timed_generate(
    model, vocab, num_objects, cache, *, images=None, memory=None, amp=None, cap_s=None, device="cpu"
) -> dict:
    """One ``generate()`` call, timed; ``encode_s`` is the encoder's share of it (when images are
    given). With ``cap_s`` (recompute only) every decoder step is timestamped and the call stops at
    the first step that starts after ``cap_s`` seconds."""
    from pix2seq.decoding import generate

    rec: dict = {"encode_s": 0.0, "starts": [], "prefix": None}
    orig_encode, orig_decode = model.encode, model.decode
    t0 = 0.0

    def encode(x):
        t = now()
        out = orig_encode(x)
        sync(device)
        rec["encode_s"] = now() - t
        return out

    def decode(tokens, mem, last_only=False):
        if cap_s is not None:
            sync(device)
            ts = now()
            if ts - t0 > cap_s and len(rec["starts"]) >= MIN_MEASURED_STEPS:
                rec["stop"] = ts
                rec["prefix"] = tokens[:, 1:].clone()
                raise _CapReached
            rec["starts"].append(ts)
        return orig_decode(tokens, mem, last_only=last_only)

    model.encode = encode  # instance attributes shadow the methods for this call only
    if cap_s is not None:
        model.decode = decode
    completed = True
    out = None
    try:
        sync(device)
        t0 = now()
        out = generate(
            model, images, vocab, num_objects, method="greedy", cache=cache, autocast_dtype=amp, memory=memory
        )
        sync(device)
        seconds = now() - t0
    except _CapReached:
        completed = False
        seconds = rec["stop"] - t0
    finally:
        del model.encode
        if cap_s is not None:
            del model.decode
    return {
        "seconds": seconds,
        "encode_s": rec["encode_s"],
        "completed": completed,
        "out": out,
        "prefix": rec["prefix"],
        "starts": rec["starts"],
        "stop": rec.get("stop"),
    }


def extrapolate(starts: list[float], stop: float, elapsed: float, length: int) -> dict:
    """Estimate a capped call's full duration from its measured steps.

    Step ``t`` of full-prefix recompute costs about ``a + b*t`` (the prefix grows by one token); the
    fit uses the measured steps after the first few. ``lower_bound_s`` charges every remaining step
    the median of the last measured ones (steps only get dearer)."""
    k = len(starts)
    ends = starts[1:] + [stop]
    d = [e - s for s, e in zip(starts, ends, strict=True)]
    remaining = length - k
    tail = d[-min(10, k) :] if k else [0.0]
    lower = elapsed + remaining * statistics.median(tail)
    skip = min(5, k // 4)
    xs, ys = list(range(skip, k)), d[skip:]
    if len(xs) >= 3:
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        var = sum((x - mx) ** 2 for x in xs)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
        a = my - b * mx
        est_rest = sum(max(a + b * t, 0.0) for t in range(k, length))
        estimate = max(elapsed + est_rest, lower)
        fit = {"a_ms": rnd(a * 1e3), "b_ms_per_step": rnd(b * 1e3, 5)}
    else:
        estimate, fit = lower, None
    return {
        "measured_steps": k,
        "total_steps": length,
        "measured_s": rnd(elapsed),
        "estimate_s": rnd(estimate),
        "lower_bound_s": rnd(lower),
        "fit": fit,
        "first_step_ms": rnd(d[0] * 1e3) if d else None,
        "last_step_ms": rnd(d[-1] * 1e3) if d else None,
    }


def _same(a, b, prefix: int | None, fp32: bool) -> tuple[bool, str]:
    import torch

    ta = a.tokens if prefix is None else a.tokens[:, :prefix]
    tb = b.tokens if prefix is None else b.tokens[:, :prefix]
    if not torch.equal(ta, tb):
        diff = (ta != tb).nonzero()
        first = diff[0].tolist() if len(diff) else None
        return False, f"tokens differ at {len(diff)} positions, first (row, step) {first}"
    if prefix is None:
        tol = {"atol": 1e-5, "rtol": 1e-4} if fp32 else {"atol": 2e-2, "rtol": 2e-2}
        if not torch.allclose(a.class_probs.float(), b.class_probs.float(), **tol):
            err = (a.class_probs.float() - b.class_probs.float()).abs().max().item()
            return False, f"class probabilities differ (max abs {err:.2e})"
    return True, "identical" if prefix is None else f"identical on the {prefix} tokens decoded before the cap"


def _rate(batch: int, seconds: float | None) -> float | None:
    return None if not seconds else round(batch / seconds, 4)


def bench_batch(model, vocab, images, args, amp, fp32: bool) -> dict:
    """All three variants at one batch size (``images`` is the batch); see the module docstring."""
    import torch

    from pix2seq.decoding import GenerationOutput, generate

    b = images.shape[0]
    n = args.num_objects
    length = 5 * n
    device = args.device
    repeats = args.repeats if b == 1 else args.repeats_batched
    cap = args.cap_s if b == 1 else args.cap_s_batched
    # larger batches: the whole call = the encoder (timed once) + decode-only (the encoder of 16
    # images at 640 px costs ~20 s on one core; running it inside every call would double the time)
    compose = b > 1 and getattr(args, "batched_whole", "run") == "compose"
    dev_type = torch.device(device).type
    amp_ctx = (
        torch.autocast(dev_type, dtype=amp) if amp is not None else torch.autocast(dev_type, enabled=False)
    )

    # the memory for decode-only runs; this also warms the encoder
    with torch.inference_mode(), amp_ctx:
        sync(device)
        t = now()
        memory = model.encode(images)
        sync(device)
        encoder_s = now() - t
    memory = memory.clone()  # an ordinary tensor (generate() runs under inference_mode anyway)
    for _, cache, _ in VARIANTS:  # warm the decode paths (allocations, kernels)
        generate(model, None, vocab, min(2, n), cache=cache, memory=memory, autocast_dtype=amp)

    whole = {k: [] for k, _, _ in VARIANTS}
    dec = {k: [] for k, _, _ in VARIANTS}
    encs = {k: [] for k, _, _ in VARIANTS}
    outs: list[tuple[str, str, object, int | None]] = []
    capped: dict = {}  # mode -> extrapolation of the capped recompute call
    sources: dict = {}  # (key, mode) -> how a number was obtained, when not a direct measurement

    def run_cached(key, cache):
        if not compose:
            r = timed_generate(model, vocab, n, cache, images=images, amp=amp, device=device)
            whole[key].append(r["seconds"])
            encs[key].append(r["encode_s"])
            outs.append((key, "whole", r["out"], None))
        r = timed_generate(model, vocab, n, cache, memory=memory, amp=amp, device=device)
        dec[key].append(r["seconds"])
        outs.append((key, "decode_only", r["out"], None))
        w = f"whole {whole[key][-1]:.2f}s, " if not compose else ""
        log(f"  batch {b} {key}: {w}decode-only {dec[key][-1]:.2f}s")

    def run_recompute():
        key = "recompute"
        derive = args.recompute_decode_only == "derive" and not compose
        r = timed_generate(
            model, vocab, n, "none", images=None if compose else images, memory=memory if compose else None,
            amp=amp, cap_s=cap, device=device,
        )  # fmt: skip
        mode = "decode_only" if compose else "whole"
        if r["completed"]:
            (dec if compose else whole)[key].append(r["seconds"])
            outs.append((key, mode, r["out"], None))
            if not compose:
                encs[key].append(r["encode_s"])
            log(f"  batch {b} recompute: {mode} {r['seconds']:.2f}s")
        else:
            ex = extrapolate(r["starts"], r["stop"], r["seconds"], length)
            capped[mode] = {"measured": "extrapolated", "cap_s": cap, **ex}
            outs.append((key, mode, r, ex["measured_steps"]))
            log(
                f"  batch {b} recompute: {mode} capped at {cap}s after {ex['measured_steps']}/{length} steps, "
                f"estimate {ex['estimate_s']}s (lower bound {ex['lower_bound_s']}s)"
            )
        if compose:
            return
        enc = r["encode_s"]
        if derive or not r["completed"]:
            # the decode part of the same call: its duration minus its encoder's
            sources[(key, "decode_only")] = "derived: the whole call minus its encoder, timed inside the call"
            if r["completed"]:
                dec[key].append(r["seconds"] - enc)
            else:
                ex = capped["whole"]
                capped["decode_only"] = {
                    **ex,
                    "measured_s": rnd(ex["measured_s"] - enc),
                    "estimate_s": rnd(ex["estimate_s"] - enc),
                    "lower_bound_s": rnd(ex["lower_bound_s"] - enc),
                }
            return
        r2 = timed_generate(model, vocab, n, "none", memory=memory, amp=amp, cap_s=cap, device=device)
        if r2["completed"]:
            dec[key].append(r2["seconds"])
            outs.append((key, "decode_only", r2["out"], None))
        else:
            ex = extrapolate(r2["starts"], r2["stop"], r2["seconds"], length)
            capped["decode_only"] = {"measured": "extrapolated", "cap_s": cap, **ex}
            outs.append((key, "decode_only", r2, ex["measured_steps"]))

    for r in range(repeats):
        for key, cache, _ in VARIANTS[::-1] if r % 2 else VARIANTS[1:]:
            if key != "recompute":
                run_cached(key, cache)
        if r == 0:
            run_recompute()
    if repeats == 0:
        run_recompute()

    if compose:  # whole call = encoder + decode-only
        how = f"composed: encoder ({encoder_s:.2f}s, timed once at this batch) + decode-only (timed)"
        for key, _, _ in VARIANTS:
            whole[key] = [encoder_s + t for t in dec[key]]
            sources[(key, "whole")] = how
        if "decode_only" in capped:
            ex = capped["decode_only"]
            capped["whole"] = {
                **ex,
                "measured_s": rnd(ex["measured_s"] + encoder_s),
                "estimate_s": rnd(ex["estimate_s"] + encoder_s),
                "lower_bound_s": rnd(ex["lower_bound_s"] + encoder_s),
            }

    # ---- equality against (c)'s first output
    ref = next(o for k, m, o, p in outs if k == "full_cache")
    checks = {}
    ok = True
    for key, mode, out, prefix in outs:
        if prefix is not None:  # a capped recompute: its decoded prefix
            out = GenerationOutput(out["prefix"], ref.class_probs[:, :0], ref.coords[:, :0])
        same, why = _same(ref, out, prefix, fp32)
        name = f"{key}/{mode}"
        if name not in checks or not same:
            checks[name] = why
        ok &= same

    # ---- per-variant numbers
    variants = {}
    for key, cache, desc in VARIANTS:
        entry: dict = {"cache": cache, "description": desc}
        for mode, times in (("whole", whole[key]), ("decode_only", dec[key])):
            if times:
                s = summary(times)
                entry[mode] = {
                    "measured": "full",
                    **s,
                    "images_per_s": _rate(b, s["best_s"]),
                    "ms_per_token": rnd(s["best_s"] / length * 1e3),
                }
            elif key == "recompute" and mode in capped:
                info = capped[mode]
                entry[mode] = {
                    **info,
                    "best_s": info["estimate_s"],
                    "images_per_s": _rate(b, info["estimate_s"]),
                    "images_per_s_at_most": _rate(b, info["lower_bound_s"]),
                    "ms_per_token": rnd(info["estimate_s"] / length * 1e3),
                }
            if (key, mode) in sources and mode in entry:
                entry[mode]["source"] = sources[(key, mode)]
        if encs[key]:
            entry["encoder_in_call_s"] = rnd(min(encs[key]))
        variants[key] = entry

    def ratio(mode: str, other: str, bound: bool = False) -> float | None:
        o = variants[other].get(mode, {})
        f = variants["full_cache"].get(mode, {})
        num = o.get("lower_bound_s") if bound and "lower_bound_s" in o else o.get("best_s")
        return rnd(num / f["best_s"], 2) if num and f.get("best_s") else None

    speedup = {}
    for mode in ("whole", "decode_only"):
        speedup[mode] = {
            "vs_recompute": ratio(mode, "recompute"),
            "vs_selfattn_cache": ratio(mode, "selfattn_cache"),
        }
        if variants["recompute"].get(mode, {}).get("measured", "full") != "full":
            speedup[mode]["vs_recompute_at_least"] = ratio(mode, "recompute", bound=True)
            speedup[mode]["vs_recompute_note"] = "extrapolated (recompute capped; see its measured_steps)"
    return {
        "batch": b,
        "encoder_s": rnd(encoder_s),
        "repeats": repeats,
        "whole_call": "composed: encoder + decode-only" if compose else "measured: generate(images)",
        "variants": variants,
        "speedup": speedup,
        "identical": ok,
        "checks": checks,
        "diversity": token_diversity(ref.tokens),
    }


def run(args: argparse.Namespace) -> dict:
    import torch

    batches = [int(x) for x in str(args.batches).split(",") if x]
    fp32 = args.dtype == "fp32"
    amp = None if fp32 else torch.bfloat16
    model, vocab = build_decoding_model(args, seed=args.seed)
    model.to(args.device)
    images = synthetic_images(max(batches), args.image_size, seed=args.seed + 1).to(args.device)
    t0 = now()
    per_batch = {}
    for b in batches:
        log(
            f"decode: batch {b}, {5 * args.num_objects} tokens, {args.dtype}, {torch.get_num_threads()} thread(s)"
        )
        per_batch[str(b)] = bench_batch(model, vocab, images[:b], args, amp, fp32)
    head = per_batch.get("1") or per_batch[str(batches[0])]
    result = {
        "benchmark": "decode",
        "machine": machine_info(torch.get_num_threads()),
        "model": model_shape(args),
        "vocab_size": vocab.vocab_size,
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "dtype": args.dtype,
        "device": args.device,
        "method": "greedy, constrained",
        "timing": "best of repeats; variants interleaved; images/s = batch / seconds",
        "headline_batch": head["batch"],
        "speedup_vs_recompute": head["speedup"]["whole"]["vs_recompute"],
        "speedup_vs_selfattn_cache": head["speedup"]["whole"]["vs_selfattn_cache"],
        "speedup_vs_recompute_decode_only": head["speedup"]["decode_only"]["vs_recompute"],
        "speedup_vs_selfattn_cache_decode_only": head["speedup"]["decode_only"]["vs_selfattn_cache"],
        "targets": TARGETS,
        "identical_outputs": all(p["identical"] for p in per_batch.values()),
        "batches": per_batch,
        "seconds": rnd(now() - t0, 1),
    }
    hv = {
        "speedup_vs_recompute": result["speedup_vs_recompute"],
        "speedup_vs_selfattn_cache": result["speedup_vs_selfattn_cache"],
    }
    result["targets_met"] = {k: (v is not None and v >= TARGETS[k]) for k, v in hv.items()}
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    add_model_args(ap)
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of (b) and (c) at batch 1 (best kept)")
    ap.add_argument("--repeats-batched", type=int, default=1, help="runs of (b) and (c) at larger batches")
    ap.add_argument("--cap-s", type=float, default=120.0, help="time cap of one (a) call at batch 1")
    ap.add_argument(
        "--cap-s-batched", type=float, default=40.0, help="time cap of one (a) call at larger batches"
    )
    ap.add_argument(
        "--recompute-decode-only",
        default="derive",
        choices=["derive", "run"],
        help="(a) decode-only: derive it from the whole call (its time minus its encoder's, timed "
        "inside the call; default, saves one O(n^2) run) or run it with memory=",
    )
    ap.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast (slower on this CPU)"
    )
    ap.add_argument(
        "--batched-whole",
        default="compose",
        choices=["compose", "run"],
        help="batches > 1: the whole call as the encoder (timed once) + decode-only (default), "
        "or run generate(images) for every variant",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup(args)
    result = run(args)
    emit(result, args)
    for b, p in result["batches"].items():
        v = p["variants"]
        log(
            f"decode batch {b}: images/s whole call: recompute {v['recompute']['whole']['images_per_s']}, "
            f"self-attn cache {v['selfattn_cache']['whole']['images_per_s']}, full cache "
            f"{v['full_cache']['whole']['images_per_s']}; speedups {p['speedup']['whole']}; identical {p['identical']}"
        )
    if not result["identical_outputs"]:
        log(
            "decode: the three caches' greedy outputs DIFFER: "
            + repr({b: p["checks"] for b, p in result["batches"].items()})
        )
        if args.dtype == "fp32":
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
