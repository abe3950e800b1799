"""The benchmark suite: runs every module, prints a table, writes ``reports/bench.json``.

    make bench                                   # = .venv/bin/python bench/run_all.py
    .venv/bin/python bench/run_all.py --threads 1 --budget-s 1800 --out reports/bench.json
    .venv/bin/python -m bench --only decode,coco_eval

Each module runs in its own process (clean peak memory, no state shared between benchmarks) with
``--json-out``; the runner merges the results with the machine's description. The comparisons are
ratios measured in one run, on one machine, with the same weights and inputs. Decoding runs in fp32
and, where the CPU has bf16 instructions, in bf16 (bench/gpu.py: bf16 on CUDA). Optional steps
(the fp32 training comparisons) run only while the elapsed time stays inside ``--budget-s``. On a
machine without CUDA the GPU section is skipped (``"gpu": null``); with one, ``bench/gpu.py`` also
writes ``bench/results/<device-name>.json``.

``--tiny`` shrinks every shape (the smoke test: correctness of the code paths, not speed);
``--inprocess`` runs the modules in this process (faster start, used by the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/run_all.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS_DIR, ROOT, log, machine_info, now, rnd  # noqa: E402

MODULES = ("decode", "train", "coco_eval", "gpu")

TINY_DECODE = [
    "--backbone",
    "resnet18",
    "--stage",
    "layer3",
    "--d-model",
    "32",
    "--encoder-layers",
    "1",
    "--decoder-layers",
    "1",
    "--heads",
    "2",
    "--mlp-dim",
    "64",
    "--num-classes",
    "4",
    "--bins",
    "16",
    "--num-objects",
    "3",
    "--image-size",
    "64",
    "--batches",
    "1,2",
    "--repeats",
    "1",
]
TINY_MODEL_SET = [
    "data.image_size=64",
    "model.backbone=resnet18",
    "model.backbone_stage=layer3",
    "model.d_model=32",
    "model.heads=2",
    "model.mlp_dim=64",
    "model.encoder_layers=1",
    "model.decoder_layers=1",
    "tokenizer.max_instances=3",
    "tokenizer.bins=16",
    "train.batch_size=2",
    "train.batch_repeat=1",
]
TINY_TRAIN = ["--num-images", "8", "--workers", "0", "--loader-batches", "2", "--warmup", "1", "--steps", "1"]
TINY_COCO_EVAL = ["--images", "20", "--dets-per-image", "10", "--repeats-faster", "1"]


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The steps: (name, module, argv, optional). Optional steps run only inside the budget."""
    t = ["--threads", str(args.threads)]
    only = set(args.only.split(",")) if args.only else set(MODULES)
    tiny_train = TINY_TRAIN + [x for s in TINY_MODEL_SET for x in ("--set", s)] if args.tiny else []
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    steps = []
    if "decode" in only:
        tiny = TINY_DECODE if args.tiny else []
        steps.append({"name": "decode", "module": "decode", "argv": t + tiny})
        if args.tiny or _cpu_bf16():  # bf16 where the device supports it
            steps.append(
                {
                    "name": "decode_bf16",
                    "module": "decode",
                    "argv": t + tiny + ["--dtype", "bf16", "--step-variants", ""],
                }
            )
    if "train" in only:
        for preset in ("coco", "demo"):
            steps.append(
                {
                    "name": f"train_{preset}_bf16",
                    "module": "train_step",
                    "argv": t + ["--preset", preset, "--amp", "bf16"] + tiny_train + data,
                }
            )
    if "coco_eval" in only:
        steps.append(
            {"name": "coco_eval", "module": "coco_eval", "argv": t + (TINY_COCO_EVAL if args.tiny else [])}
        )
    if "train" in only and not args.no_fp32:
        for preset in ("coco", "demo"):
            steps.append(
                {
                    "name": f"train_{preset}_fp32",
                    "module": "train_step",
                    "optional": True,
                    "estimate_from": f"train_{preset}_bf16",
                    "argv": t
                    + ["--preset", preset, "--amp", "off"]
                    + tiny_train
                    + data
                    + ["--loader-batches", "0"],
                }
            )
    if "gpu" in only:
        steps.append({"name": "gpu", "module": "gpu", "argv": ["--out", str(args.results_dir)]})
    return steps


def _cpu_bf16() -> bool:
    from pix2seq.precision import cpu_has_bf16

    return cpu_has_bf16()


def run_step(step: dict[str, Any], tmp: Path, inprocess: bool) -> tuple[int, dict | None, float]:
    out = tmp / f"{step['name']}.json"
    argv = step["argv"] + ["--json-out", str(out)]
    t = now()
    if inprocess:
        import importlib

        mod = importlib.import_module(f"bench.{step['module']}")
        try:
            rc = mod.main(argv)
        except Exception as e:  # noqa: BLE001 - one failing benchmark must not lose the others
            log(f"{step['name']}: {type(e).__name__}: {e}")
            rc = 1
    else:
        cmd = [sys.executable, str(ROOT / "bench" / f"{step['module']}.py"), *argv]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL).returncode
    seconds = now() - t
    data = json.loads(out.read_text()) if out.exists() else None
    return rc, data, seconds


def _strip(d: dict | None) -> dict | None:
    if d is None:
        return None
    return {k: v for k, v in d.items() if k not in ("machine", "benchmark")}


def aggregate(
    raw: dict[str, dict | None],
    machine: dict,
    steps: list[dict],
    runtime_s: float,
    threads: int,
    notes: list[str],
) -> dict[str, Any]:
    """The report: machine, decode, train (per preset, per amp), loader vs training, coco_eval, gpu."""
    train: dict[str, Any] = {}
    for name, res in raw.items():
        if not name.startswith("train_") or res is None:
            continue
        preset = res["preset"]
        entry = train.setdefault(
            preset,
            {
                k: v
                for k, v in _strip(res).items()
                if k not in ("amp", "loader_vs_train", "seconds", "maxrss_mb")
            },
        )
        entry.setdefault("amp", {}).update(
            {a: {**r, "process_maxrss_mb": res.get("maxrss_mb")} for a, r in res["amp"].items()}
        )
        entry.setdefault("loader_vs_train", {}).update(res["loader_vs_train"])
        if res.get("loader") and not entry.get("loader"):
            entry["loader"] = res["loader"]
    loader = {}
    for preset, entry in train.items():
        lo = entry.get("loader")
        for _a, c in entry["loader_vs_train"].items():
            if lo and "loader_samples_per_s" not in c:
                c["loader_samples_per_s"] = lo["samples_per_s"]
                c["loader_headroom"] = rnd(lo["samples_per_s"] / c["train_samples_per_s"], 2)
                c["loader_is_bottleneck"] = bool(c["loader_headroom"] < 1.2 or c["data_wait_fraction"] > 0.05)
        loader[preset] = {
            "loader_samples_per_s_alone": lo["samples_per_s"] if lo else None,
            "workers": entry["config"]["workers"],
            "image_size": entry["config"]["image_size"],
            "batch": entry["config"]["samples_per_step"],
            "per_amp": entry["loader_vs_train"],
            "loader_is_bottleneck": any(
                c.get("loader_is_bottleneck") for c in entry["loader_vs_train"].values()
            ),
        }
    gpu = raw.get("gpu")
    gpu = gpu.get("gpu") if isinstance(gpu, dict) else None
    return {
        "schema": 1,
        "machine": machine,
        "threads": threads,
        "notes": notes,
        "decode": _strip(raw.get("decode")),
        "decode_bf16": _strip(raw.get("decode_bf16")),
        "train": train,
        "loader": loader,
        "coco_eval": _strip(raw.get("coco_eval")),
        "gpu": gpu,
        "steps": steps,
        "runtime_s": rnd(runtime_s, 1),
    }


# ------------------------------------------------------------------------------------- table


def _f(x: Any, nd: int = 2, suffix: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}{suffix}"
    return f"{x}{suffix}"


def _rows(header: list[str], rows: list[list[str]], left: int = 2) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i < left else f"{{:>{w}}}" for i, w in enumerate(widths))
    return ["  " + fmt.format(*header), "  " + fmt.format(*["-" * w for w in widths])] + [
        "  " + fmt.format(*[str(c) for c in r]) for r in rows
    ]


def _rate(x: dict | None) -> str:
    if not x:
        return "-"
    s = _f(x.get("images_per_s"), 3)
    return s if x.get("measured", "full") == "full" else f"~{s} (<= {_f(x.get('images_per_s_at_most'), 3)})"


def _secs(x: dict | None) -> str:
    if not x:
        return "-"
    if x.get("measured", "full") == "full":
        return _f(x.get("best_s"), 2)
    return f"~{_f(x.get('estimate_s'), 1)} (>= {_f(x.get('lower_bound_s'), 1)})"


_DESIGNS = {
    "recompute": "(a) recompute (cache=none)",
    "selfattn_cache": "(b) self-attn cache (self)",
    "full_cache": "(c) full cache (ours, full)",
    "full_cache_pre17": "(c) step before issue 17",
    "full_cache_eager": "(c) eager step",
    "full_cache_static": "(c) static step, op by op",
    "full_cache_compile": "(c) torch.compile step",
    "full_cache_graph": "(c) CUDA-graph step",
}


def _decode_lines(d: dict[str, Any]) -> list[str]:
    """The decoding section of one dtype: whole calls per design and batch, then the step table."""
    sh = d["model"]
    out = [
        "",
        f"DECODING {d['dtype']}  greedy {sh['generated_tokens']} tokens, {sh['backbone']} {sh['stage']}, "
        f"{sh['encoder_layers']}+{sh['decoder_layers']} layers, d {sh['d_model']}, {sh['image_size']} px, "
        f"{sh['num_classes']} classes, {sh['bins']} bins (vocab {d['vocab_size']}), {d['parameters_m']} M "
        f"params, random weights; best of repeats, variants interleaved; {d.get('clock', 'wall')} clock",
    ]
    rows = []
    for b, p in d["batches"].items():
        for key, label in _DESIGNS.items():
            v = p["variants"].get(key)
            if v is None:
                continue
            w, dec = v.get("whole"), v.get("decode_only")
            what = []
            for x in (w, dec):
                if (x or {}).get("measured", "full") != "full":
                    what.append(
                        f"extrapolated: {x['measured_steps']}/{x['total_steps']} steps in a {x['cap_s']:g}s cap"
                    )
                    break
            if (w or {}).get("source", "").startswith("composed"):
                what.append("whole = encoder + decode-only")
            if (dec or {}).get("source", "").startswith("derived"):
                what.append("decode-only = the call minus its encoder")
            if "compile_s" in v:
                what.append(f"built once in {v['compile_s']:.1f}s")
            rows.append(
                [
                    b,
                    label,
                    _secs(w),
                    _rate(w),
                    _f(v.get("encoder_share"), 2),
                    _secs(dec),
                    _rate(dec),
                    _f((dec or {}).get("ms_per_token"), 2),
                    "; ".join(what) or "measured",
                ]
            )
    out += _rows(
        ["batch", "variant", "whole s", "whole img/s", "encoder share", "decode-only s", "decode img/s",
         "ms/step", "what"],
        rows,
    )  # fmt: skip
    for b, p in d["batches"].items():
        s = p["speedup"]
        line = f"  batch {b}: (c) vs (a) whole {_f(s['whole']['vs_recompute'])}x"
        if "vs_recompute_at_least" in s["whole"]:
            line += f" (extrapolated; at least {_f(s['whole']['vs_recompute_at_least'])}x measured)"
        line += (
            f" | (c) vs (b) whole {_f(s['whole']['vs_selfattn_cache'])}x, decode-only "
            f"{_f(s['decode_only']['vs_selfattn_cache'])}x | step vs before issue 17 "
            f"{_f(s['decode_only'].get('vs_pre17'))}x | outputs identical: {'yes' if p['identical'] else 'NO'}"
        )
        out.append(line)
    pk = d["peaks"]
    out += [
        "",
        f"  one decode step (decode-only time / tokens) against its arithmetic: peak {pk['gemm_flops_per_s'] / 1e9:.1f} "
        f"GFLOP/s, memory {pk['stream_bytes_per_s'] / 1e9:.1f} GB/s ({pk['how']})",
    ]
    out += _rows(
        ["batch", "variant", "ms/step", "MFLOP/step", "GFLOP/s", "x arith", "MB/step", "GB/s", "x memory"],
        [
            [
                r["batch"],
                _DESIGNS.get(r["variant"], r["variant"]),
                _f(r["ms_per_step"], 3) + ("" if r["measured"] == "full" else " ~"),
                _f(r["mflop_per_step"], 1),
                _f(r["gflop_per_s"], 1),
                _f(r["x_arith"], 1),
                _f(r.get("mb_per_step"), 1),
                _f(r.get("gb_per_s"), 1),
                _f(r.get("x_memory"), 2),
            ]
            for r in d["steps"]
        ],
    )
    tgt, met = d["targets"], d.get("targets_met", {})
    out.append(
        "  targets: "
        + "; ".join(
            f"{k} {_f(d.get(k))}x (>= {v:g}x: {'met' if met.get(k) else 'NOT MET' if k in met else 'not measured'})"
            for k, v in tgt.items()
        )
    )
    div = next(iter(d["batches"].values()))["diversity"]
    out.append(
        f"  greedy outputs identical across all variants: {'yes' if d['identical_outputs'] else 'NO'} "
        f"(not trivial: {div['distinct_coord_tokens']} distinct coordinate tokens, >= "
        f"{div['min_distinct_per_row']} per image)"
    )
    return out


def format_table(rep: dict[str, Any]) -> str:
    m = rep["machine"]
    out = [
        f"Stable-Pix2Seq benchmarks: {m['date']}, {m['cpu_model']}, {m['cpu_count']} CPUs, torch {m['torch']}, "
        f"{rep['threads']} intra-op thread(s), load average at start {m.get('load_avg')} (shared machine: noisy; "
        "ratios are measured within this run)",
    ]
    for key in ("decode", "decode_bf16"):
        if rep.get(key):
            out += _decode_lines(rep[key])
    if rep.get("train"):
        out += [
            "",
            "TRAINING  one optimizer step (engine's step: autocast forward + loss, backward, clip + AdamW); "
            "median ms per step; images/s = samples per step / median step",
        ]
        rows = []
        for preset, e in rep["train"].items():
            c = e["config"]
            for a, r in e["amp"].items():
                sp = r["split_ms"]
                rows.append(
                    [
                        preset,
                        a,
                        f"{c['backbone']} {c['stage']} {c['encoder_layers']}+{c['decoder_layers']} "
                        f"d{c['d_model']} {c['image_size']}px",
                        f"{c['batch_size']}x{c['batch_repeat']}",
                        _f(r["images_per_s"], 2),
                        _f(r["step_s"]["median"], 2),
                        _f(sp["data_wait"], 1),
                        _f(sp["forward"], 0),
                        _f(sp["backward"], 0),
                        _f(sp["optimizer"], 0),
                        f"{_f(r['peak_rss_mb'], 0)} (+{_f(r['workers_peak_rss_mb'], 0)})",
                        f"{r['warmup_steps']}+{r['steps']}",
                    ]
                )
        out += _rows(
            [
                "preset",
                "amp",
                "model",
                "batch",
                "img/s",
                "step s",
                "data ms",
                "fwd ms",
                "bwd ms",
                "opt ms",
                "peak RSS MiB (workers)",
                "warm+timed",
            ],
            rows,
        )
    if rep.get("loader"):
        out += ["", "LOADER vs TRAINING  (loader alone: same config and workers, timed before training)"]
        rows = []
        for preset, lo in rep["loader"].items():
            for a, c in lo["per_amp"].items():
                rows.append(
                    [
                        preset,
                        a,
                        f"{lo['image_size']}px, {lo['workers']} workers, batch {lo['batch']}",
                        _f(c.get("loader_samples_per_s"), 1),
                        _f(c["train_samples_per_s"], 2),
                        _f(c.get("loader_headroom"), 1, "x"),
                        _f(100 * c["data_wait_fraction"], 2, "%"),
                        "YES" if c.get("loader_is_bottleneck") else "no",
                    ]
                )
        out += _rows(
            [
                "preset",
                "amp",
                "loader",
                "loader samples/s",
                "train samples/s",
                "headroom",
                "data wait",
                "bottleneck",
            ],
            rows,
        )
    ce = rep.get("coco_eval")
    if ce:
        out += [
            "",
            f"COCO EVAL  {ce['images']} images x {ce['dets_per_image']} detections ({ce['detections']} dets, "
            f"{ce['ground_truth_boxes']} GT boxes), through pix2seq.evaluation.coco_evaluate",
        ]
        out += _rows(
            ["backend", "best s", "runs", "images/s"],
            [
                [
                    "faster_coco_eval",
                    _f(ce["faster_coco_eval"]["best_s"]),
                    len(ce["faster_coco_eval"]["runs_s"]),
                    _f(ce["faster_coco_eval"]["images_per_s"], 0),
                ],
                [
                    "pycocotools",
                    _f(ce["pycocotools"]["best_s"]),
                    len(ce["pycocotools"]["runs_s"]),
                    _f(ce["pycocotools"]["images_per_s"], 0),
                ],
            ],
            left=1,
        )
        out.append(
            f"  speedup {_f(ce['speedup'])}x; {sum(1 for _ in ce['metrics']['faster_coco_eval'])} metrics "
            f"{'equal' if ce['metrics_equal'] else 'DIFFERENT'} (max |diff| {ce['metrics_max_abs_diff']:.1e} on "
            f"0-100, {ce['metrics_exactly_equal']}/{ce['metrics_compared']} bit-identical; precision arrays max "
            f"|diff| {ce['precision_max_abs_diff']:.1e}); AP {ce['metrics']['pycocotools']['AP']:.3f}"
        )
    out.append("")
    g = rep.get("gpu")
    if g is None:
        out.append(
            'GPU  no GPU (CUDA unavailable): skipped ("gpu": null). On a GPU machine: '
            "python bench/gpu.py --out bench/results/"
        )
    else:
        out.append(
            f"GPU  {g['device']}: peak bf16 {_f((g.get('peak_bf16_flops') or 0) / 1e12, 0)} TFLOP/s "
            f"({g['peak_source']}); {_f(g['train_flops_per_step'] / 1e12, 2)} TFLOP per training step "
            f"(batch {g['config']['batch']})"
        )
        rows = [
            [
                v,
                "",
                _f(r.get("images_per_s"), 1),
                _f(r.get("step_s"), 4),
                _f(r.get("tflops_per_s"), 1),
                _f(r.get("mfu"), 3),
                _f(r.get("max_memory_allocated_mb"), 0),
                r.get("error", "")[:60],
            ]
            for v, r in g["train"].items()
        ]
        out += _rows(
            ["train variant", "", "img/s", "step s", "TFLOP/s", "MFU", "max alloc MiB", "error"], rows
        )
        ev = g.get("eval")
        if ev:
            out.append(
                f"  eval: batch {ev['batch']}, {ev['tokens']} tokens, {ev['dtype']}, full cache, step "
                f"{ev.get('step', 'eager')} (built in {_f(ev.get('step_compile_s'), 2)} s): "
                f"{_f(ev['images_per_s'], 1)} images/s"
            )
            c = ev.get("caches")
            if c:
                out.append(
                    f"  caches at batch {c['batch']}: (c) vs (a) {_f(c['speedup']['whole']['vs_recompute'])}x, "
                    f"(c) vs (b) {_f(c['speedup']['whole']['vs_selfattn_cache'])}x, identical: {c['identical']}"
                )
            if ev.get("steps"):
                out += _rows(
                    ["batch", "step", "ms/step", "MFLOP/step", "x arith", "GB/s", "built in s"],
                    [
                        [
                            r["batch"],
                            _DESIGNS.get(r["variant"], r["variant"]),
                            _f(r["ms_per_step"], 3),
                            _f(r["mflop_per_step"], 1),
                            _f(r["x_arith"], 1),
                            _f(r.get("gb_per_s"), 1),
                            _f(
                                (ev["caches_batch1"] if r["batch"] == 1 else ev["caches"])["variants"]
                                .get(r["variant"], {})
                                .get("compile_s"),
                                2,
                            ),
                        ]
                        for r in ev["steps"]
                        if r["variant"].startswith("full_cache")
                    ],
                )
    out.append("")
    out.append(
        f"runtime {_f(rep['runtime_s'], 0)} s; steps: "
        + ", ".join(
            f"{s['name']} {_f(s['seconds'], 0)}s{'' if s['rc'] == 0 else ' (rc ' + str(s['rc']) + ')'}"
            + (" SKIPPED" if s.get("skipped") else "")
            for s in rep["steps"]
        )
    )
    for n in rep.get("notes", []):
        out.append(f"note: {n}")
    return "\n".join(out)


# -------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench.json"))
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for every module")
    ap.add_argument("--budget-s", type=float, default=1800.0, help="optional steps run only inside this")
    ap.add_argument("--only", default="", help=f"comma list of {','.join(MODULES)}")
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32 training comparisons")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--inprocess", action="store_true", help="run the modules in this process")
    ap.add_argument("--data-dir", default="", help="cache of the generated datasets (train_step's default)")
    ap.add_argument("--results-dir", default=str(RESULTS_DIR), help="where bench/gpu.py writes <device>.json")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = now()
    import torch

    if args.threads > 0 and args.inprocess:
        torch.set_num_threads(args.threads)
    machine = machine_info(args.threads)
    steps = plan(args)
    has_gpu = torch.cuda.is_available()
    raw: dict[str, dict | None] = {}
    done: list[dict] = []
    notes = []
    failed = []
    with tempfile.TemporaryDirectory(prefix="pix2seq-bench-") as tmp:
        for step in steps:
            name = step["name"]
            if step["module"] == "gpu" and not has_gpu:
                raw[name] = {"gpu": None}
                done.append({"name": name, "seconds": 0.0, "rc": 0, "skipped": True, "why": "no GPU"})
                continue
            if step.get("optional"):
                est = next((s["seconds"] for s in done if s["name"] == step.get("estimate_from")), 0.0)
                if now() - t0 + est > args.budget_s:
                    done.append(
                        {
                            "name": name,
                            "seconds": 0.0,
                            "rc": 0,
                            "skipped": True,
                            "why": f"budget {args.budget_s:g}s",
                        }
                    )
                    notes.append(f"{name} skipped: it would end past the {args.budget_s:g}s budget")
                    continue
            log(f"[bench] {name} ...")
            rc, data, secs = run_step(step, Path(tmp), args.inprocess)
            raw[name] = data
            done.append({"name": name, "seconds": rnd(secs, 1), "rc": rc})
            if rc != 0:
                failed.append(name)
            log(f"[bench] {name}: {secs:.0f}s, rc {rc}")
    machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    from pix2seq.precision import choose

    notes.append(f"train.amp auto on this machine: {choose('auto', 'cpu').describe()}")
    rep = aggregate(raw, machine, done, now() - t0, args.threads, notes)
    rep["command"] = " ".join(
        [Path(sys.executable).name, "bench/run_all.py", *(argv if argv is not None else sys.argv[1:])]
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=1) + "\n")
    print(format_table(rep))
    print(f"\nwrote {out}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
