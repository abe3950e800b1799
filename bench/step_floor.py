"""What one decode step costs in its parts, with PyTorch's kernels on this machine (issue 17).

Times on one thread, in isolation, the parts of one step of the COCO-shaped decoder (6 layers,
d 256, 8 heads, MLP 1024, 1,083 tokens, 400 memory cells) at ``--rows`` rows, in fp32 and bf16:

- ``linears``: the step's 37 matrix products (4 + 2 per layer and the output head), every weight
  distinct and stored ``(in, out)`` as the step stores them, so each is read once from wherever it
  is (23 MB in fp32: more than the 1 MB L2 of a core, less than a 32 MB L3);
- ``attention``: the step's 24 attention products and 12 softmaxes, self-attention over
  ``--filled`` cached positions and cross-attention over the memory, as :func:`decoder_step`
  runs them;
- ``overhead``: the same step (:func:`pix2seq.precision.step_ms`: ``decoder_step`` + the output
  head) of a decoder with d 32 and MLP 128: the same ops on tiny tensors, i.e. dispatch and Python;
- ``step``: the whole step of the COCO shape (the same function), best of 3.

``linears + attention`` is what the matrix products alone cost; the step adds the other ~100 ops
(layer norms, GELU, residual adds, cache writes). A step target below ``linears + attention`` is
out of reach with these kernels whatever removes the overhead.

    .venv/bin/python bench/step_floor.py --rows 1 8 16 --json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/step_floor.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_common_args, emit, log, machine_info, rnd, setup  # noqa: E402

LAYERS, D, HEADS, MLP, VOCAB, CELLS = 6, 256, 8, 1024, 1083, 400


def best_ms(fn, repeats: int) -> float:
    """Thread CPU milliseconds of ``fn()``, best of ``repeats`` after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return best * 1e3


def linear_shapes() -> list[tuple[int, int]]:
    """``(in, out)`` of the step's matrix products, in order."""
    per_layer = [(D, 3 * D), (D, D), (D, D), (D, D), (D, MLP), (MLP, D)]
    return per_layer * LAYERS + [(D, VOCAB)]


def parts(rows: int, filled: int, dtype, repeats: int) -> dict[str, float]:
    """Milliseconds of each part of one step at ``rows`` rows (see the module docstring)."""
    import torch

    from pix2seq.precision import step_ms

    g = torch.Generator().manual_seed(0)
    shapes = linear_shapes()
    weights = [torch.randn(i, o, generator=g).to(dtype) for i, o in shapes]
    biases = [torch.zeros(o, dtype=dtype) for _, o in shapes]
    inputs = {n: torch.randn(rows, n, generator=g).to(dtype) for n in (D, MLP)}

    def linears() -> None:
        for w, b in zip(weights, biases, strict=True):
            torch.addmm(b, inputs[w.shape[0]], w)

    bh, dh, n = rows * HEADS, D // HEADS, filled + 1
    keys = [torch.randn(bh, dh, filled + 64, generator=g).to(dtype) for _ in range(LAYERS)]
    values = [torch.randn(bh, filled + 64, dh, generator=g).to(dtype) for _ in range(LAYERS)]
    cross_k = [torch.randn(bh, dh, CELLS, generator=g).to(dtype) for _ in range(LAYERS)]
    cross_v = [torch.randn(bh, CELLS, dh, generator=g).to(dtype) for _ in range(LAYERS)]
    q = torch.randn(bh, 1, dh, generator=g).to(dtype)

    def attention() -> None:
        for k, v, ck, cv in zip(keys, values, cross_k, cross_v, strict=True):
            torch.bmm(torch.bmm(q, k.narrow(2, 0, n)).softmax(-1), v.narrow(1, 0, n))
            torch.bmm(torch.bmm(q, ck).softmax(-1), cv)

    with torch.inference_mode():
        return {
            "linears_ms": best_ms(linears, repeats),
            "attention_ms": best_ms(attention, repeats),
            "overhead_ms": min(
                step_ms(rows, dtype, filled, d_model=32, heads=4, mlp_dim=128) for _ in range(3)
            ),
            "step_ms": min(step_ms(rows, dtype, filled) for _ in range(3)),
        }


def run(args: argparse.Namespace) -> dict:
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    table = []
    for rows in args.rows:
        for name in args.dtypes:
            p = parts(rows, args.filled, dtypes[name], args.repeats)
            floor = p["linears_ms"] + p["attention_ms"]
            row = {"rows": rows, "dtype": name, **{k: rnd(v, 3) for k, v in p.items()}}
            row["products_ms"] = rnd(floor, 3)
            row["products_share_of_step"] = rnd(floor / p["step_ms"], 3)
            table.append(row)
            log(
                f"rows {rows} {name}: step {p['step_ms']:.2f} ms = matrix products {floor:.2f} "
                f"(linears {p['linears_ms']:.2f} + attention {p['attention_ms']:.2f}) + the rest; "
                f"the same ops at d 32: {p['overhead_ms']:.2f} ms"
            )
    shape = {"layers": LAYERS, "d_model": D, "heads": HEADS, "mlp_dim": MLP, "vocab": VOCAB, "cells": CELLS}
    return {
        "machine": machine_info(args.threads),
        "shape": shape,
        "filled": args.filled,
        "clock": "thread CPU time, best of repeats",
        "rows": table,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16], help="batch sizes (rows) to time")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument(
        "--filled",
        type=int,
        default=250,
        help="positions already in the self-attention cache (500 tokens: 250 on average)",
    )
    ap.add_argument("--repeats", type=int, default=20, help="timed runs of each part (the best is kept)")
    args = ap.parse_args(argv)
    if min(args.rows) < 1 or args.repeats < 1 or args.filled < 0:
        ap.error("--rows and --repeats must be >= 1, --filled >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup(args)
    emit(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
