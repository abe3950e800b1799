"""Smoke test of the benchmark suite (bench/): every code path on tiny shapes.

Correctness only: the JSON report's structure, the equality checks, the capped-recompute
extrapolation, the no-GPU path and the GPU code on the CPU. No speed assertions (speed targets
live in the benchmarks, measured by ``make bench``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import decode, gpu, run_all, step_floor  # noqa: E402
from bench.run_all import TINY_DECODE, TINY_MODEL_SET  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The whole suite, tiny and in-process: (report dict, printed table)."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    rc = run_all.main(
        [
            "--tiny",
            "--inprocess",
            "--out",
            str(out),
            "--data-dir",
            str(tmp / "data"),
            "--results-dir",
            str(tmp / "results"),
        ]
    )
    assert rc == 0
    rep = json.loads(out.read_text())
    return rep, run_all.format_table(rep)


def test_report_structure(report):
    rep, table = report
    m = rep["machine"]
    for key in ("cpu_count", "torch", "torch_threads", "date", "cpu_model"):
        assert m[key] is not None
    assert rep["threads"] == 1
    assert [s["name"] for s in rep["steps"]][:1] == ["decode"]
    assert all(s["rc"] == 0 for s in rep["steps"])
    assert "DECODING" in table and "TRAINING" in table and "COCO EVAL" in table


def test_decode_section(report):
    rep, table = report
    for key in ("decode", "decode_bf16"):
        d = rep[key]
        assert d["identical_outputs"] is True or key == "decode_bf16"
        assert d["speedup_vs_recompute"] > 0 and d["speedup_vs_selfattn_cache"] > 0
        assert d["step_speedup_vs_pre17"] > 0
        assert set(d["targets_met"]) == {
            "speedup_vs_recompute",
            "speedup_vs_selfattn_cache",
            "step_speedup_vs_pre17",
        }  # no batch 8 in the tiny run
        assert d["peaks"]["gemm_flops_per_s"] > 0 and d["peaks"]["stream_bytes_per_s"] > 0
        for p in d["batches"].values():
            designs = {"recompute", "selfattn_cache", "full_cache", "full_cache_pre17"}
            assert designs <= set(p["variants"])
            for k in designs - {"full_cache_pre17"}:
                v = p["variants"][k]
                assert v["whole"]["images_per_s"] > 0 and v["decode_only"]["images_per_s"] > 0
                assert 0 < v["encoder_share"] < 1
            assert p["speedup"]["whole"]["vs_recompute"] > 0 and p["speedup"]["decode_only"]["vs_pre17"] > 0
            assert all(c.startswith("identical") for c in p["checks"].values()) or key == "decode_bf16"
            assert p["diversity"]["distinct_coord_tokens"] >= 1
        # the step table: batch 1 of every variant with a decode-only time, FLOPs and bytes counted
        rows = {r["variant"]: r for r in d["steps"] if r["batch"] == 1}
        assert {"full_cache", "full_cache_pre17", "selfattn_cache"} <= set(rows)
        full = rows["full_cache"]
        assert full["mflop_per_step"] > 0 and full["x_arith"] > 0 and full["mb_per_step"] > 0
        assert rows["selfattn_cache"]["mflop_per_step"] > full["mflop_per_step"]  # the re-projection
    static = rep["decode"]["batches"]["1"]["variants"]["full_cache_static"]
    assert static["compile_s"] >= 0 and static["decode_only"]["images_per_s"] > 0
    assert "DECODING fp32" in table and "DECODING bf16" in table and "x arith" in table


def test_step_cost_counts_the_coco_step():
    """~16 MFLOP and ~31 MB per step at batch 1 for the COCO shape (fp32, full cache)."""
    import argparse

    ns = argparse.Namespace(**{k.replace("-", "_"): v for k, v in decode.parse_args([]).__dict__.items()})
    shape = decode.model_shape(ns)
    c = decode.step_cost(shape, 3 + 80 + 1000, "full", 1, 4)
    assert 15e6 < c["flops"] < 17e6 and 30e6 < c["bytes"] < 32e6
    assert decode.step_cost(shape, 1083, "full", 16, 4)["flops"] == pytest.approx(16 * c["flops"])
    assert decode.step_cost(shape, 1083, "self", 1, 4)["flops"] > 30 * c["flops"]


def test_train_and_loader_sections(report):
    rep = report[0]
    assert set(rep["train"]) == {"coco", "demo"}
    for preset, e in rep["train"].items():
        assert set(e["amp"]) == {"bf16", "fp32"}, preset
        for r in e["amp"].values():
            assert r["losses_finite"] and r["images_per_s"] > 0 and r["peak_rss_mb"] > 0
            assert set(r["split_ms"]) == {"data_wait", "h2d", "forward", "backward", "optimizer"}
        lo = rep["loader"][preset]
        assert lo["loader_samples_per_s_alone"] > 0
        assert all(c["loader_headroom"] > 0 for c in lo["per_amp"].values())
    assert rep["train"]["demo"]["config"]["batch_size"] == 2  # the tiny override applies


def test_coco_eval_and_gpu_sections(report):
    rep, table = report
    ce = rep["coco_eval"]
    assert ce["metrics_equal"] and ce["metrics_compared"] == 12
    assert ce["faster_coco_eval"]["best_s"] > 0 and ce["pycocotools"]["best_s"] > 0
    if not torch.cuda.is_available():
        assert rep["gpu"] is None
        assert "no GPU" in table


def test_step_floor_times_the_parts_of_a_step(capsys):
    assert (
        step_floor.main(["--rows", "2", "--dtypes", "fp32", "--repeats", "1", "--filled", "8", "--json"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    (row,) = out["rows"]
    assert (row["rows"], row["dtype"]) == (2, "fp32")
    assert all(row[k] > 0 for k in ("linears_ms", "attention_ms", "overhead_ms", "step_ms"))
    assert row["products_ms"] == pytest.approx(row["linears_ms"] + row["attention_ms"], abs=2e-3)
    assert len(step_floor.linear_shapes()) == 37  # 6 per layer and the output head


@pytest.mark.parametrize("batch", ["1", "2"])
def test_recompute_cap_extrapolates(tmp_path, batch):
    """A capped (a) call, whole (batch 1) or decode-only with a composed whole call (batch 2), and a
    capped (b) at batch 2: labelled, extrapolated, and their decoded prefixes equal (c)'s."""
    out = tmp_path / "d.json"
    cap = "--cap-s" if batch == "1" else "--cap-s-batched"
    argv = TINY_DECODE + ["--batches", batch, "--num-objects", "4", cap, "0", "--cap-s-self", "0"]
    assert decode.main(argv + ["--step-variants", "", "--json-out", str(out)]) == 0
    p = json.loads(out.read_text())["batches"][batch]
    v = p["variants"]["recompute"]
    for mode in ("whole", "decode_only"):
        assert (
            v[mode]["measured"] == "extrapolated" and v[mode]["measured_steps"] >= decode.MIN_MEASURED_STEPS
        )
        assert 0 < v[mode]["lower_bound_s"] <= v[mode]["estimate_s"]
        assert "vs_recompute_at_least" in p["speedup"][mode]
    assert v["whole"]["estimate_s"] > v["decode_only"]["estimate_s"]  # the encoder is in the whole call
    mode = "whole" if batch == "1" else "decode_only"
    assert p["checks"][f"recompute/{mode}"].startswith("identical on the")
    assert p["whole_call"].startswith("measured" if batch == "1" else "composed")
    if batch == "2":
        s = p["variants"]["selfattn_cache"]["decode_only"]
        assert s["measured"] == "extrapolated" and s["measured_steps"] >= decode.MIN_MEASURED_STEPS
        assert p["checks"]["selfattn_cache/decode_only"].startswith("identical on the")
        assert "vs_selfattn_cache_at_least" in p["speedup"]["whole"]


def test_extrapolate_linear_steps():
    """Steps costing 1 + 0.1 t: the fit recovers the full duration; the lower bound stays below it."""
    length, k = 100, 30
    d = [1.0 + 0.1 * t for t in range(length)]
    starts = [sum(d[:t]) for t in range(k)]
    stop = sum(d[:k])
    ex = decode.extrapolate(starts, stop, stop, length)
    assert ex["estimate_s"] == pytest.approx(sum(d), rel=1e-3)
    assert ex["lower_bound_s"] < ex["estimate_s"]


def test_gpu_code_on_cpu(tmp_path):
    """bench/gpu.py's code paths (FLOP count, MFU, variants, eval, cache comparison) on the CPU."""
    sets = [
        x
        for s in TINY_MODEL_SET
        for x in ("--set", s)
        if not s.startswith(("data.image_size", "tokenizer.max"))
    ]
    out = tmp_path / "g.json"
    argv = [
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "results"),
        "--image-size",
        "64",
        "--num-objects",
        "3",
        "--num-classes",
        "4",
        "--batch",
        "2",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--variants",
        "eager,channels_last",
        "--eval-batch",
        "2",
        "--eval-repeats",
        "1",
        "--cap-s",
        "30",
        "--step-variants",
        "eager,static",
        "--peak-tflops",
        "1",
        "--json-out",
        str(out),
        *sets,
    ]
    assert gpu.main(argv) == 0
    g = json.loads(out.read_text())["gpu"]
    assert g["train_flops_per_step"] > 0
    for v in ("eager", "channels_last"):
        r = g["train"][v]
        assert "error" not in r, r
        assert r["images_per_s"] > 0 and r["mfu"] > 0 and r["losses_finite"]
    assert g["eval"]["images_per_s"] > 0 and g["eval"]["batch"] == 2
    ev = g["eval"]
    assert {"recompute", "selfattn_cache", "full_cache", "full_cache_eager", "full_cache_static"} <= set(
        ev["caches"]["variants"]
    )
    assert ev["caches"]["identical"] and ev["caches_batch1"]["identical"]
    assert {r["batch"] for r in ev["steps"]} == {1, 2} and ev["peaks"]["gemm_flops_per_s"] > 0
    written = list((tmp_path / "results").glob("*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["device"] == g["device"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_skipped_without_cuda(tmp_path, capsys):
    out = tmp_path / "g.json"
    assert gpu.main(["--out", str(tmp_path), "--json-out", str(out)]) == 0
    assert json.loads(out.read_text()) == {"gpu": None, "reason": "no CUDA device"}
    assert not list(tmp_path.glob("*.json"))[1:]  # only the --json-out file


def test_peak_table():
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert gpu.peak_flops("NVIDIA H100 PCIe")[0] == 756e12
    assert gpu.peak_flops("NVIDIA H200")[0] == 989e12
    assert gpu.peak_flops("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert gpu.peak_flops("Some Future GPU")[0] is None
    assert gpu.peak_flops("Some Future GPU", 100.0)[0] == 100e12
    assert gpu.device_file_name("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"
