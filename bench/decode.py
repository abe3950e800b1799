"""Decoding: the three cache designs end to end, and what one decode step costs against its arithmetic.

Spec section 5 and issue 17. Same weights, same images, one process, greedy decoding of
``5 * num_objects`` tokens with the COCO model shape (ResNet-50 C5, 6+6 layers, d 256, 100 objects
= 500 tokens, 80 classes, 1000 bins, 640 px) at batch 1, 8 and 16, in ``--dtype`` (fp32, or bf16
autocast: run it twice for both):

- (a) ``recompute``       ``cache="none"``: the whole prefix re-run every step (the seed's design);
- (b) ``selfattn_cache``  ``cache="self"``: self-attention K/V cached, the image memory's
  cross-attention K/V re-projected every step (Pretrained-Pix2Seq's design);
- (c) ``full_cache``      ``cache="full"``: ours, cross-attention K/V projected once per image, the
  step as ``generate(step="auto")`` runs it on this device;
- ``full_cache_pre17``    (c) with the step as it was before issue 17 (the module's weight layout,
  ``StepCache.transpose_weights = False``): decode-only, side by side with (c);
- ``full_cache_static`` / ``full_cache_compile``: (c) through the static-shape step run op by op /
  compiled by ``torch.compile`` (``--step-variants``; batch 1; compile time reported).

Each design is timed for the whole :func:`pix2seq.decoding.generate` call (encoder included) and
decode-only (``memory=``). Variants are interleaved round by round and the best of the repeats is
kept. At batch 1 every whole call is run as such; at larger batches the encoder (16 images at
640 px: ~20 s on one core) is timed once and the whole call is composed as encoder + decode-only
(labelled ``composed``; ``--batched-whole run`` runs ``generate(images)`` instead). (a), and (b) at
batches > 1, run once per batch under a time cap: when the cap stops them, the per-step times
measured so far (a + b*t, fitted) are extrapolated to the full length and the result is labelled
``extrapolated`` with the measured step count and a lower bound. (a)'s decode-only time is by
default derived from its whole call (its duration minus its encoder's, timed inside the call).

The step table: decode-only seconds / tokens = the time of one step (the decoder, the logits and
the token's selection) at batch 1 and 16, against its arithmetic: FLOPs per step (counted from the
shapes, averaged over the sequence), bytes it must read per step (weights, cross-attention K/V,
the self-attention cache so far), and this machine's one-thread peak (a 1024^3 GEMM) and memory
bandwidth (a 256 MiB reduction), measured at the start: ``x_arith`` = step time / (FLOPs / peak),
``x_memory`` = step time / (bytes / bandwidth). At batch 1 a step is bound by reading ~31 MB of
weights and caches, not by its ~16 MFLOP.

The greedy outputs of all variants must be identical (tokens equal, class probabilities close;
for a capped call, its measured prefix): recorded, and in float32 a mismatch fails the run (exit
1). Random weights are rescaled (:func:`bench.common.rescale_for_decoding`) and the token
diversity is recorded, so "identical" is not vacuous.

    .venv/bin/python bench/decode.py --json                      # the COCO shape, batch 1, 8 and 16
    .venv/bin/python bench/decode.py --dtype bf16 --json         # the same under bf16 autocast
    .venv/bin/python bench/decode.py --batches 1 --num-objects 20 # quicker
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
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

# the designs of the whole-call table: (key in the report, generate(cache=...), description)
VARIANTS = (
    ("recompute", "none", "full-prefix recompute every step (seed)"),
    (
        "selfattn_cache",
        "self",
        "self-attn K/V cache, cross-attn K/V re-projected every step (Pretrained-Pix2Seq)",
    ),
    ("full_cache", "full", "self-attn K/V cache + cross-attn K/V projected once per image (ours)"),
)
# step variants of (c), decode-only: key -> (generate(step=...), description)
STEP_VARIANTS = {
    "full_cache_pre17": ("eager", "(c), the step before issue 17 (module weight layout)"),
    "full_cache_eager": ("eager", "(c), the eager step (eval.step: eager)"),
    "full_cache_static": ("static", "(c), the static-shape step, op by op"),
    "full_cache_compile": ("compile", "(c), the static-shape step compiled by torch.compile"),
    "full_cache_graph": ("graph", "(c), the static-shape step replayed as a CUDA graph"),
}
TARGETS = {
    "speedup_vs_recompute": 10.0,
    "speedup_vs_selfattn_cache": 2.0,
    "step_speedup_vs_pre17": 2.0,  # batch 1, decode-only step
    "whole_speedup_vs_selfattn_cache_batch8": 4.0,
}
MIN_MEASURED_STEPS = 3  # a capped call measures at least this many steps (something to extrapolate)


def cpu_clock() -> float:
    """This thread's CPU time: with one intra-op thread the work of a call, without the time a busy
    shared machine keeps the thread waiting (on CUDA use the wall clock)."""
    return time.thread_time()


def bench_clock(args):
    return cpu_clock if getattr(args, "clock", "wall") == "cpu" else now


class _CapReached(Exception):
    pass


def timed_generate(
    model,
    vocab,
    num_objects,
    cache,
    *,
    images=None,
    memory=None,
    amp=None,
    cap_s=None,
    device="cpu",
    step="auto",
    pre17=False,
    clock=now,
) -> dict:
    """One ``generate()`` call, timed; ``encode_s`` is the encoder's share of it (when images are
    given). With ``cap_s`` (an eager step) every decoder step is timestamped and the call stops at
    the first step that starts after ``cap_s`` seconds. ``pre17``: the step's weights read as
    before issue 17 (``StepCache.transpose_weights = False``). ``clock``: wall (``now``) or this
    thread's CPU time (:func:`cpu_clock`)."""
    import torch

    from pix2seq.decoding import generate
    from pix2seq.model.transformer import StepCache

    rec: dict = {"encode_s": 0.0, "starts": [], "prefix": None}
    orig_encode = model.encode
    hooked = "decode" if cache == "none" else "decode_step"
    orig_step = getattr(model, hooked)
    t0 = 0.0

    def encode(x):
        t = clock()
        out = orig_encode(x)
        sync(device)
        rec["encode_s"] = clock() - t
        return out

    def capped_step(tokens, state, **kw):
        sync(device)
        ts = clock()
        if ts - t0 > cap_s and len(rec["starts"]) >= MIN_MEASURED_STEPS:
            rec["stop"] = ts
            if cache == "none":  # tokens: the prompt and everything generated so far
                rec["prefix"] = tokens[:, 1:].clone()
            else:  # the inputs so far (prompt first) and this step's input, the last one generated
                rec["prefix"] = torch.cat([state.tokens[:, 1 : state.pos], tokens[:, None]], 1)
            raise _CapReached
        rec["starts"].append(ts)
        return orig_step(tokens, state, **kw)

    model.encode = encode  # instance attributes shadow the methods for this call only
    if cap_s is not None:
        setattr(model, hooked, capped_step)
    completed = True
    out = None
    StepCache.transpose_weights = not pre17
    try:
        sync(device)
        t0 = clock()
        out = generate(
            model, images, vocab, num_objects, method="greedy", cache=cache, autocast_dtype=amp, memory=memory,
            step=step,
        )  # fmt: skip
        sync(device)
        seconds = clock() - t0
    except _CapReached:
        completed = False
        seconds = rec["stop"] - t0
    finally:
        StepCache.transpose_weights = True
        del model.encode
        if cap_s is not None:
            delattr(model, hooked)
    return {
        "seconds": seconds,
        "encode_s": rec["encode_s"],
        "completed": completed,
        "out": out,
        "prefix": rec["prefix"],
        "starts": rec["starts"],
        "stop": rec.get("stop"),
        "compile_s": out.compile_s if out is not None else 0.0,
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


def step_cost(shape: dict, vocab_size: int, cache: str, batch: int, elem_bytes: int) -> dict:
    """FLOPs and bytes of one decode step of ``batch`` rows, averaged over the sequence (positions
    attend to n = 1 .. L tokens). Bytes: what a step must read at least (weights, the cross-attention
    K/V and the self-attention cache so far), for the full cache only (where they bound the step)."""
    d, m, nl = shape["d_model"], shape["mlp_dim"], shape["decoder_layers"]
    length = shape["generated_tokens"]
    stride = 32 if shape["stage"] == "layer4" else 16 if shape["stage"] == "layer3" else 8
    s = (shape["image_size"] // stride) ** 2
    n_avg = (length + 1) / 2
    linear = 12 * d * d + 4 * d * m  # qkv, self out, cross q, cross out, MLP
    per_row = nl * (linear + 4 * d * n_avg + 4 * d * s) + 2 * d * vocab_size
    if cache == "self":
        per_row += nl * 4 * s * d * d  # the memory's K/V re-projected every step
    elif cache == "none":  # every step re-runs the prefix, its memory projection included
        n2_avg = sum(n * n for n in range(1, length + 1)) / length
        per_row = nl * (n_avg * (linear + 4 * d * s) + 2 * d * n2_avg + 4 * s * d * d) + 2 * d * vocab_size
    weights = nl * (6 * d * d + 2 * d * m) + vocab_size * d
    caches = batch * nl * 2 * d * (s + n_avg)
    out = {"flops": batch * per_row}
    if cache == "full":
        out["bytes"] = elem_bytes * (weights + caches)
    return out


def machine_peaks(dtype: str, device: str = "cpu", clock=now) -> dict:
    """The arithmetic peak (a GEMM in ``dtype``) and memory bandwidth (a reduction over a large
    tensor) of this device as the benchmark uses it (CPU: one thread), best of 3: the denominators
    of the step table."""
    import torch

    cuda = torch.device(device).type == "cuda"
    n, mib = (8192, 2048) if cuda else (1024, 256)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=device).to(dt)
    big = torch.ones(mib * 2**18, device=device)
    gemm, stream = [], []
    for _ in range(3):
        sync(device)
        t = clock()
        a @ a
        sync(device)
        gemm.append(clock() - t)
        t = clock()
        big.sum()
        sync(device)
        stream.append(clock() - t)
    who = "the device" if cuda else "one thread"
    return {
        "gemm_flops_per_s": rnd(2 * n**3 / min(gemm), 0),
        "stream_bytes_per_s": rnd(big.numel() * 4 / min(stream), 0),
        "how": f"{who}: a {n}^3 {dtype} GEMM, a sum over {mib} MiB; best of 3",
    }


def _specs(args, b: int, device: str) -> dict:
    """key -> how to run it: cache, step, pre17, description, time cap (None: complete)."""
    import torch

    cap_recompute = args.cap_s if b == 1 else args.cap_s_batched
    out = {
        "recompute": dict(cache="none", step="eager", cap=cap_recompute),
        "selfattn_cache": dict(cache="self", step="eager", cap=None if b == 1 else args.cap_s_self),
        "full_cache": dict(cache="full", step="auto", cap=None),
        "full_cache_pre17": dict(cache="full", step="eager", pre17=True, cap=None, decode_only=True),
    }
    for key, _, desc in VARIANTS:
        out[key]["description"] = desc
    out["full_cache_pre17"]["description"] = STEP_VARIANTS["full_cache_pre17"][1]
    if b in getattr(args, "step_batches", {1}):
        cuda = torch.device(device).type == "cuda"
        for mode in [x for x in args.step_variants.split(",") if x]:
            if mode == "graph" and not cuda:
                continue
            key = f"full_cache_{mode}"
            out[key] = dict(cache="full", step=mode, cap=None, decode_only=True, build=True)
            out[key]["description"] = STEP_VARIANTS[key][1]
    return out


def bench_batch(model, vocab, images, args, amp, fp32: bool) -> dict:
    """Every variant at one batch size (``images`` is the batch); see the module docstring."""
    import torch

    from pix2seq.decoding import GenerationOutput, generate

    b = images.shape[0]
    n = args.num_objects
    length = 5 * n
    device = args.device
    repeats = args.repeats if b == 1 else args.repeats_batched
    # larger batches: the whole call = the encoder (timed once) + decode-only (the encoder of 16
    # images at 640 px costs ~20 s on one core; running it inside every call would double the time)
    compose = b > 1 and getattr(args, "batched_whole", "run") == "compose"
    dev_type = torch.device(device).type
    amp_ctx = (
        torch.autocast(dev_type, dtype=amp) if amp is not None else torch.autocast(dev_type, enabled=False)
    )
    specs = _specs(args, b, device)
    clock = bench_clock(args)

    # the memory for decode-only runs; this also warms the encoder
    with torch.inference_mode(), amp_ctx:
        sync(device)
        t = clock()
        memory = model.encode(images)
        sync(device)
        encoder_s = clock() - t
    memory = memory.clone()  # an ordinary tensor (generate() runs under inference_mode anyway)
    for spec in specs.values():  # warm the eager decode paths (allocations, kernels)
        if not spec.get("build"):
            generate(model, None, vocab, min(2, n), cache=spec["cache"], memory=memory, autocast_dtype=amp)

    times = {k: {"whole": [], "decode_only": []} for k in specs}
    encs = {k: [] for k in specs}
    compile_s: dict[str, float] = {}
    outs: list[tuple[str, str, object, int | None]] = []
    capped: dict = {k: {} for k in specs}  # key -> mode -> extrapolation of a capped call
    sources: dict = {}  # (key, mode) -> how a number was obtained, when not a direct measurement

    def run_one(key: str, mode: str) -> dict:
        spec = specs[key]
        r = timed_generate(
            model, vocab, n, spec["cache"], images=images if mode == "whole" else None,
            memory=memory if mode == "decode_only" else None, amp=amp, cap_s=spec["cap"], device=device,
            step=spec["step"], pre17=spec.get("pre17", False), clock=clock,
        )  # fmt: skip
        if r["completed"]:
            times[key][mode].append(r["seconds"])
            outs.append((key, mode, r["out"], None))
            if mode == "whole":
                encs[key].append(r["encode_s"])
            log(f"  batch {b} {key}: {mode} {r['seconds']:.2f}s")
        else:
            ex = extrapolate(r["starts"], r["stop"], r["seconds"], length)
            capped[key][mode] = {"measured": "extrapolated", "cap_s": spec["cap"], **ex}
            outs.append((key, mode, r, ex["measured_steps"]))
            log(
                f"  batch {b} {key}: {mode} capped at {spec['cap']}s after {ex['measured_steps']}/{length} "
                f"steps, estimate {ex['estimate_s']}s (lower bound {ex['lower_bound_s']}s)"
            )
        return r

    def derive_decode_only(key: str, r: dict) -> None:
        """A capped or once-run call's decode part: its duration minus its encoder's."""
        sources[(key, "decode_only")] = "derived: the whole call minus its encoder, timed inside the call"
        enc = r["encode_s"]
        if r["completed"]:
            times[key]["decode_only"].append(r["seconds"] - enc)
        else:
            ex = capped[key]["whole"]
            capped[key]["decode_only"] = {
                **ex,
                "measured_s": rnd(ex["measured_s"] - enc),
                "estimate_s": rnd(ex["estimate_s"] - enc),
                "lower_bound_s": rnd(ex["lower_bound_s"] - enc),
            }

    for key, spec in specs.items():  # compiled steps: built by a first call (not timed)
        if spec.get("build"):
            r = timed_generate(
                model, vocab, n, "full", memory=memory, amp=amp, device=device, step=spec["step"], clock=clock
            )
            compile_s[key] = r["compile_s"]
            log(f"  batch {b} {key}: built in {r['compile_s']:.1f}s")
    keys = list(specs)
    for rnd_i in range(max(repeats, 1)):
        for key in keys[::-1] if rnd_i % 2 else keys:
            spec = specs[key]
            once = spec["cap"] is not None
            if once and rnd_i > 0:
                continue
            if not spec.get("decode_only") and not compose:
                r = run_one(key, "whole")
                if once and args.recompute_decode_only == "derive":
                    derive_decode_only(key, r)
                    continue
            run_one(key, "decode_only")

    if compose:  # whole call = encoder + decode-only
        how = f"composed: encoder ({encoder_s:.2f}s, timed once at this batch) + decode-only (timed)"
        for key, spec in specs.items():
            if spec.get("decode_only"):
                continue
            times[key]["whole"] = [encoder_s + t for t in times[key]["decode_only"]]
            sources[(key, "whole")] = how
            if "decode_only" in capped[key]:
                ex = capped[key]["decode_only"]
                capped[key]["whole"] = {
                    **ex,
                    "measured_s": rnd(ex["measured_s"] + encoder_s),
                    "estimate_s": rnd(ex["estimate_s"] + encoder_s),
                    "lower_bound_s": rnd(ex["lower_bound_s"] + encoder_s),
                }

    # ---- equality against (c)'s first decode-only output
    ref = next(o for k, m, o, p in outs if k == "full_cache" and m == "decode_only")
    checks = {}
    ok = True
    for key, mode, out, prefix in outs:
        if prefix is not None:  # a capped call: its decoded prefix
            out = GenerationOutput(out["prefix"], ref.class_probs[:, :0], ref.coords[:, :0])
        same, why = _same(ref, out, prefix, fp32)
        name = f"{key}/{mode}"
        if name not in checks or not same:
            checks[name] = why
        ok &= same

    # ---- per-variant numbers
    elem = 2 if amp is not None else 4
    variants = {}
    for key, spec in specs.items():
        entry: dict = {k: spec[k] for k in ("cache", "step", "description")}
        for mode in ("whole", "decode_only"):
            t = times[key][mode]
            if t:
                sm = summary(t)
                entry[mode] = {
                    "measured": "full",
                    **sm,
                    "images_per_s": _rate(b, sm["best_s"]),
                    "ms_per_token": rnd(sm["best_s"] / length * 1e3),
                }
            elif mode in capped[key]:
                info = capped[key][mode]
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
        whole_s = entry.get("whole", {}).get("best_s")
        if whole_s:
            enc = entry.get("encoder_in_call_s", encoder_s)
            entry["encoder_share"] = rnd(enc / whole_s, 3)
        if key in compile_s:
            entry["compile_s"] = rnd(compile_s[key], 2)
        entry["cost"] = step_cost(args.shape, vocab.vocab_size, spec["cache"], b, elem)
        variants[key] = entry

    def ratio(mode: str, other: str, of: str = "full_cache", bound: bool = False) -> float | None:
        o = variants[other].get(mode, {})
        f = variants[of].get(mode, {})
        num = o.get("lower_bound_s") if bound and "lower_bound_s" in o else o.get("best_s")
        return rnd(num / f["best_s"], 2) if num and f.get("best_s") else None

    speedup = {}
    for mode in ("whole", "decode_only"):
        speedup[mode] = {
            "vs_recompute": ratio(mode, "recompute"),
            "vs_selfattn_cache": ratio(mode, "selfattn_cache"),
        }
        for other in ("recompute", "selfattn_cache"):
            if variants[other].get(mode, {}).get("measured", "full") != "full":
                speedup[mode][f"vs_{other}_at_least"] = ratio(mode, other, bound=True)
                speedup[mode][f"vs_{other}_note"] = f"extrapolated ({other} capped; see its measured_steps)"
    speedup["decode_only"]["vs_pre17"] = ratio("decode_only", "full_cache_pre17")
    return {
        "batch": b,
        "encoder_s": rnd(encoder_s),
        "repeats": repeats,
        "whole_call": "composed: encoder + decode-only" if compose else "measured: generate(images)",
        "variants": variants,
        "speedup": speedup,
        "identical": ok,
        "checks": checks,
        "diversity": token_diversity(ref.tokens.cpu()),
    }


def step_table(per_batch: dict, peaks: dict, batches: tuple[str, ...] = ("1", "16")) -> list[dict]:
    """One row per (batch, variant with a decode-only time): ms per step against its arithmetic."""
    rows = []
    for b, p in per_batch.items():
        if b not in batches:
            continue
        for key, v in p["variants"].items():
            dec = v.get("decode_only")
            if not dec:
                continue
            step_s = dec["ms_per_token"] / 1e3
            cost = v["cost"]
            row = {
                "batch": int(b),
                "variant": key,
                "ms_per_step": dec["ms_per_token"],
                "measured": dec.get("measured", "full"),
                "mflop_per_step": rnd(cost["flops"] / 1e6, 3),
                "gflop_per_s": rnd(cost["flops"] / step_s / 1e9, 2),
                "x_arith": rnd(step_s / (cost["flops"] / peaks["gemm_flops_per_s"]), 1),
            }
            if "bytes" in cost:
                row["mb_per_step"] = rnd(cost["bytes"] / 1e6, 3)
                row["gb_per_s"] = rnd(cost["bytes"] / step_s / 1e9, 2)
                row["x_memory"] = rnd(step_s / (cost["bytes"] / peaks["stream_bytes_per_s"]), 2)
            rows.append(row)
    return rows


def run(args: argparse.Namespace) -> dict:
    import torch

    batches = [int(x) for x in str(args.batches).split(",") if x]
    fp32 = args.dtype == "fp32"
    amp = None if fp32 else torch.bfloat16
    args.shape = model_shape(args)
    model, vocab = build_decoding_model(args, seed=args.seed)
    model.to(args.device)
    from pix2seq.precision import use_channels_last

    channels_last = not fp32 and use_channels_last("bf16", args.device)
    if channels_last:  # what evaluation does with bf16 where measured faster
        model.to(memory_format=torch.channels_last)
    images = synthetic_images(max(batches), args.image_size, seed=args.seed + 1).to(args.device)
    peaks = machine_peaks(args.dtype, args.device, bench_clock(args))
    t0 = now()
    per_batch = {}
    for b in batches:
        log(
            f"decode: batch {b}, {5 * args.num_objects} tokens, {args.dtype}, {torch.get_num_threads()} thread(s)"
        )
        per_batch[str(b)] = bench_batch(model, vocab, images[:b], args, amp, fp32)
    head = per_batch.get("1") or per_batch[str(batches[0])]
    b8 = per_batch.get("8")
    result = {
        "benchmark": "decode",
        "machine": machine_info(torch.get_num_threads()),
        "model": args.shape,
        "vocab_size": vocab.vocab_size,
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "dtype": args.dtype,
        "channels_last_encoder": channels_last,
        "device": args.device,
        "method": "greedy, constrained",
        "clock": args.clock,
        "timing": f"best of repeats; variants interleaved; images/s = batch / seconds ({args.clock} clock)",
        "peaks": peaks,
        "headline_batch": head["batch"],
        "speedup_vs_recompute": head["speedup"]["whole"]["vs_recompute"],
        "speedup_vs_selfattn_cache": head["speedup"]["whole"]["vs_selfattn_cache"],
        "speedup_vs_recompute_decode_only": head["speedup"]["decode_only"]["vs_recompute"],
        "speedup_vs_selfattn_cache_decode_only": head["speedup"]["decode_only"]["vs_selfattn_cache"],
        "step_speedup_vs_pre17": head["speedup"]["decode_only"]["vs_pre17"],
        "whole_speedup_vs_selfattn_cache_batch8": b8["speedup"]["whole"]["vs_selfattn_cache"] if b8 else None,
        "targets": TARGETS,
        "identical_outputs": all(p["identical"] for p in per_batch.values()),
        "batches": per_batch,
        "steps": step_table(per_batch, peaks),
        "seconds": rnd(now() - t0, 1),
    }
    result["targets_met"] = {k: result[k] >= v for k, v in TARGETS.items() if result.get(k) is not None}
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    add_model_args(ap)
    ap.add_argument("--batches", default="1,8,16", help="comma-separated batch sizes (default %(default)s)")
    ap.add_argument(
        "--repeats", type=int, default=2, help="runs of the uncapped variants at batch 1 (best kept)"
    )
    ap.add_argument("--repeats-batched", type=int, default=1, help="the same at larger batches")
    ap.add_argument("--cap-s", type=float, default=30.0, help="time cap of one (a) call at batch 1")
    ap.add_argument(
        "--cap-s-batched", type=float, default=20.0, help="time cap of one (a) call at larger batches"
    )
    ap.add_argument("--cap-s-self", type=float, default=25.0, help="time cap of one (b) call at batches > 1")
    ap.add_argument(
        "--step-variants",
        default="static,compile,graph",
        help="(c) through these steps too (eager, static, compile, graph: CUDA only), at batch 1 ('' for none)",
    )
    ap.add_argument(
        "--recompute-decode-only",
        default="derive",
        choices=["derive", "run"],
        help="a capped design's decode-only time: derive it from its whole call (its time minus its "
        "encoder's, timed inside the call; default, saves one run) or run it with memory=",
    )
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    ap.add_argument(
        "--batched-whole",
        default="compose",
        choices=["compose", "run"],
        help="batches > 1: the whole call as the encoder (timed once) + decode-only (default), "
        "or run generate(images) for every variant",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--clock",
        default=None,
        choices=["cpu", "wall"],
        help="cpu: the thread's CPU time (default on a CPU: a shared machine's other tenants do not "
        "count; one intra-op thread), wall: elapsed time (default on CUDA)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.clock is None:
        args.clock = "wall" if args.device.startswith("cuda") else "cpu"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup(args)
    result = run(args)
    emit(result, args)
    for b, p in result["batches"].items():
        v = p["variants"]
        log(
            f"decode batch {b} ({args.dtype}): images/s whole call: recompute {v['recompute']['whole']['images_per_s']}, "
            f"self-attn cache {v['selfattn_cache']['whole']['images_per_s']}, full cache "
            f"{v['full_cache']['whole']['images_per_s']}; speedups {p['speedup']['whole']}; identical {p['identical']}"
        )
    if not result["identical_outputs"]:
        log(
            "decode: the variants' greedy outputs DIFFER: "
            + repr({b: p["checks"] for b, p in result["batches"].items()})
        )
        if args.dtype == "fp32":
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
