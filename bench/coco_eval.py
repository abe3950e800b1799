"""COCO box AP computation: faster-coco-eval vs pycocotools on the same detections.

A realistic-sized synthetic set: a generated COCO-format ground truth (--images images, COCO's 80
category ids, 1-15 objects per image with sizes from small to large, 1% crowd boxes) and exactly
--dets-per-image detections per image (jittered ground-truth boxes with mostly correct classes,
duplicates and random false positives, random scores), i.e. what a Pix2Seq evaluation of 100
objects per image produces. Both backends run through :func:`pix2seq.evaluation.coco.coco_evaluate`
(the project's API: the same copying and conversion for both); the report has the time of each
(best of the repeats, interleaved), the speedup, and the equality of all 12 metrics and of the
precision arrays.

    .venv/bin/python bench/coco_eval.py --json                 # 500 images x 100 detections
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/coco_eval.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_common_args, emit, log, machine_info, now, rnd, setup, summary  # noqa: E402

COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
SIZES = ((640, 480), (480, 640), (640, 427), (427, 640), (500, 375), (640, 640))


def make_ground_truth(num_images: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(num_images):
        w, h = SIZES[int(rng.integers(len(SIZES)))]
        images.append({"id": i + 1, "width": w, "height": h, "file_name": f"{i + 1:012d}.jpg"})
        for _ in range(int(rng.integers(1, 16))):
            side = float(np.exp(rng.uniform(np.log(6), np.log(0.8 * min(w, h)))))
            ar = float(np.exp(rng.uniform(np.log(1 / 3), np.log(3))))
            bw, bh = min(side * ar**0.5, w - 1), min(side / ar**0.5, h - 1)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": COCO_CATEGORY_IDS[int(rng.integers(80))],
                    "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)],
                    "area": round(bw * bh, 2),
                    "iscrowd": int(rng.random() < 0.01),
                }
            )
    cats = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in COCO_CATEGORY_IDS]
    return {"info": {}, "images": images, "annotations": anns, "categories": cats}


def make_detections(gt: dict, per_image: int, seed: int = 1) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    by_image: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    dets = []
    for im in gt["images"]:
        w, h = im["width"], im["height"]
        out = []
        for a in by_image.get(im["id"], []):
            for _ in range(1 + int(rng.random() < 0.3)):  # 30% get a duplicate
                if len(out) >= per_image or rng.random() > 0.9:
                    continue
                x, y, bw, bh = a["bbox"]
                nw, nh = bw * float(np.exp(rng.normal(0, 0.15))), bh * float(np.exp(rng.normal(0, 0.15)))
                nx, ny = x + rng.normal(0, 0.1 * bw), y + rng.normal(0, 0.1 * bh)
                cat = a["category_id"] if rng.random() < 0.85 else COCO_CATEGORY_IDS[int(rng.integers(80))]
                out.append(
                    {
                        "image_id": im["id"],
                        "category_id": cat,
                        "bbox": [nx, ny, nw, nh],
                        "score": float(np.clip(rng.normal(0.7, 0.15), 0.01, 1.0)),
                    }
                )
        while len(out) < per_image:  # random false positives, low scores
            bw, bh = float(rng.uniform(4, w / 2)), float(rng.uniform(4, h / 2))
            out.append(
                {
                    "image_id": im["id"],
                    "category_id": COCO_CATEGORY_IDS[int(rng.integers(80))],
                    "bbox": [float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), bw, bh],
                    "score": float(rng.uniform(0.0, 0.5)),
                }
            )
        dets.extend(out)
    return dets


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from pix2seq.evaluation.coco import METRIC_NAMES, coco_evaluate

    t_start = now()
    gt = make_ground_truth(args.images, args.seed)
    dets = make_detections(gt, args.dets_per_image, args.seed + 1)
    log(f"coco_eval: {args.images} images, {len(gt['annotations'])} boxes, {len(dets)} detections")
    times: dict[str, list[float]] = {"faster_coco_eval": [], "pycocotools": []}
    results = {}
    order = []
    for r in range(max(args.repeats_faster, args.repeats_pycocotools)):
        if r < args.repeats_faster:
            order.append("faster_coco_eval")
        if r < args.repeats_pycocotools:
            order.append("pycocotools")
    for backend in order:
        t = now()
        res = coco_evaluate(gt, dets, backend=backend)
        times[backend].append(now() - t)
        results.setdefault(backend, res)
        log(f"  {backend}: {times[backend][-1]:.2f}s, AP {res.metrics['AP']:.3f}")
    fast, ref = results["faster_coco_eval"], results["pycocotools"]
    diffs = {k: abs(fast.metrics[k] - ref.metrics[k]) for k in METRIC_NAMES}
    prec_diff = float(np.max(np.abs(np.asarray(fast.precision) - np.asarray(ref.precision))))
    tol = args.tolerance
    t_fast, t_ref = min(times["faster_coco_eval"]), min(times["pycocotools"])
    return {
        "benchmark": "coco_eval",
        "machine": machine_info(torch.get_num_threads()),
        "images": args.images,
        "ground_truth_boxes": len(gt["annotations"]),
        "detections": len(dets),
        "dets_per_image": args.dets_per_image,
        "faster_coco_eval": {
            **summary(times["faster_coco_eval"]),
            "images_per_s": rnd(args.images / t_fast, 1),
        },
        "pycocotools": {**summary(times["pycocotools"]), "images_per_s": rnd(args.images / t_ref, 1)},
        "speedup": rnd(t_ref / t_fast, 2),
        "metrics": {"faster_coco_eval": fast.metrics, "pycocotools": ref.metrics},
        "metrics_max_abs_diff": max(diffs.values()),
        "metrics_exactly_equal": sum(fast.metrics[k] == ref.metrics[k] for k in METRIC_NAMES),
        "metrics_equal": all(d <= tol for d in diffs.values()),
        "metrics_compared": len(METRIC_NAMES),
        "tolerance": tol,
        "precision_max_abs_diff": prec_diff,
        "seconds": rnd(now() - t_start, 1),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--dets-per-image", type=int, default=100)
    ap.add_argument("--repeats-faster", type=int, default=3)
    ap.add_argument("--repeats-pycocotools", type=int, default=1)
    ap.add_argument("--tolerance", type=float, default=1e-6, help="metrics equal within this (0-100 scale)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup(args)
    result = run(args)
    emit(result, args)
    log(
        f"coco_eval: faster-coco-eval {result['faster_coco_eval']['best_s']}s, pycocotools "
        f"{result['pycocotools']['best_s']}s ({result['speedup']}x); {result['metrics_compared']} metrics equal: "
        f"{result['metrics_equal']} (max abs diff {result['metrics_max_abs_diff']:.2e})"
    )
    return 0 if result["metrics_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
