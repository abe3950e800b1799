"""COCO evaluation: faster-coco-eval == pycocotools, edge cases, conversion, report plots."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pix2seq.evaluation import METRIC_NAMES, coco_evaluate, detections_to_coco
from pix2seq.evaluation.plots import (
    draw_detections,
    plot_pr_curve,
    save_grid,
    write_per_class_table,
    write_pr_curve_csv,
)

CATS = [{"id": 3, "name": "circle"}, {"id": 8, "name": "square"}, {"id": 11, "name": "triangle"}]


def _gt() -> dict:
    """6 images of 300x300, 3 categories, small/medium/large boxes, one crowd box, one empty image."""
    rng = random.Random(0)
    images = [{"id": i, "width": 300, "height": 300, "file_name": f"{i}.png"} for i in range(1, 7)]
    anns = []
    for img in images[:-1]:
        for _ in range(rng.randint(2, 5)):
            w = rng.choice([12, 20, 40, 70, 120])
            h = max(4, int(w * rng.uniform(0.6, 1.4)))
            x, y = rng.uniform(0, 300 - w), rng.uniform(0, 300 - h)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img["id"],
                    "category_id": rng.choice(CATS)["id"],
                    "bbox": [round(x, 1), round(y, 1), w, h],
                    "area": float(w * h),
                    "iscrowd": 0,
                }
            )
    anns.append(
        {
            "id": len(anns) + 1,
            "image_id": 1,
            "category_id": 3,
            "bbox": [200, 200, 90, 90],
            "area": 8100.0,
            "iscrowd": 1,
        }
    )
    return {"images": images, "annotations": anns, "categories": CATS}


def _dets(gt: dict) -> list[dict]:
    """Perfect, shifted and wrong-class copies of the GT, plus pure false positives, varied scores."""
    rng = random.Random(1)
    dets = []
    for a in gt["annotations"]:
        if a["iscrowd"]:
            continue
        x, y, w, h = a["bbox"]
        cat, mine = a["category_id"], []
        r = rng.random()
        if r < 0.4:  # perfect
            mine.append({"bbox": [x, y, w, h], "category_id": cat, "score": rng.uniform(0.5, 1)})
        elif r < 0.8:  # shifted by 5-35% of the width: hits some IoU thresholds, misses others
            dx = w * rng.uniform(0.05, 0.35)
            mine.append({"bbox": [x + dx, y, w, h], "category_id": cat, "score": rng.uniform(0.2, 0.9)})
        # else: missed
        if rng.random() < 0.3:  # duplicate with a lower score
            mine.append({"bbox": [x + 1, y + 1, w, h], "category_id": cat, "score": rng.uniform(0, 0.3)})
        if rng.random() < 0.2:  # right box, wrong class
            other = rng.choice([c["id"] for c in CATS if c["id"] != cat])
            mine.append({"bbox": [x, y, w, h], "category_id": other, "score": rng.uniform(0, 1)})
        dets += [{"image_id": a["image_id"], **d} for d in mine]
    for img in gt["images"]:  # false positives everywhere, including the empty image
        for _ in range(2):
            dets.append(
                {
                    "image_id": img["id"],
                    "category_id": rng.choice(CATS)["id"],
                    "bbox": [
                        rng.uniform(0, 250),
                        rng.uniform(0, 250),
                        rng.uniform(5, 50),
                        rng.uniform(5, 50),
                    ],
                    "score": rng.uniform(0, 1),
                }
            )
    return dets


def test_faster_coco_eval_matches_pycocotools():
    gt = _gt()
    dets = _dets(gt)
    fast = coco_evaluate(gt, dets, backend="faster_coco_eval")
    ref = coco_evaluate(gt, dets, backend="pycocotools")
    assert list(fast.metrics) == list(METRIC_NAMES)
    assert 5 < fast.metrics["AP"] < 95  # a non-trivial case, not all-or-nothing
    for k in METRIC_NAMES:
        assert fast.metrics[k] == pytest.approx(ref.metrics[k], abs=1e-6), k
    for a, b in zip(fast.per_class, ref.per_class, strict=True):
        assert a["category_id"] == b["category_id"] and a["name"] == b["name"]
        for k in ("AP", "AP50", "AP75"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), (a["name"], k)
    np.testing.assert_allclose(fast.precision, ref.precision, atol=1e-9)
    np.testing.assert_allclose(fast.precision_iou50, ref.precision_iou50, atol=1e-9)
    assert fast.precision_iou50.shape == fast.recall_thresholds.shape == (101,)
    assert fast.precision_per_class_iou50.shape == (3, 101)
    # the mean PR curve at IoU .5 integrates to AP50
    assert fast.precision_iou50.mean() * 100 == pytest.approx(fast.metrics["AP50"], abs=1e-6)
    assert fast.summary.count("Average Precision") == 6 and ref.summary.count("Average Precision") == 6


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_perfect_and_empty_detections(backend):
    gt = _gt()
    before = json.dumps(gt, sort_keys=True)
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]
    r = coco_evaluate(gt, perfect, backend=backend)
    for k in ("AP", "AP50", "AP75", "AR100"):
        assert r.metrics[k] == pytest.approx(100.0, abs=1e-6)
    assert all(c["AP"] == pytest.approx(100.0, abs=1e-6) for c in r.per_class)

    e = coco_evaluate(gt, [], backend=backend)
    assert e.num_detections == 0
    assert e.metrics["AP"] == 0.0 and e.metrics["AP50"] == 0.0 and e.metrics["AR100"] == 0.0
    assert all(c["AP"] == 0.0 for c in e.per_class)
    assert json.dumps(gt, sort_keys=True) == before  # the caller's GT is never modified


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_img_ids_subset(backend, tmp_path):
    gt = _gt()
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    # perfect on images 1-2, nothing on the others: the subset scores 100, the whole set less
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in gt["annotations"]
        if a["image_id"] in (1, 2) and not a["iscrowd"]
    ]
    sub = coco_evaluate(path, dets, backend=backend, img_ids=[1, 2])
    full = coco_evaluate(path, dets, backend=backend)
    assert sub.img_ids == [1, 2]
    assert sub.metrics["AP50"] == pytest.approx(100.0, abs=1e-6)
    assert full.metrics["AP50"] < 100.0
    n_sub = sum(1 for a in gt["annotations"] if a["image_id"] in (1, 2) and not a["iscrowd"])
    assert sum(c["num_gt"] for c in sub.per_class) == n_sub


def test_bad_inputs_are_named():
    gt = _gt()
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_evaluate(gt, [{"image_id": 999, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1}])
    with pytest.raises(ValueError, match="img_ids"):
        coco_evaluate(gt, [], img_ids=[1, 999])
    with pytest.raises(ValueError, match="backend"):
        coco_evaluate(gt, [], backend="nope")


def test_detections_to_coco_roundtrip():
    gt = _gt()
    cat_ids = [c["id"] for c in CATS]  # label i -> category id
    by_img: dict[int, list] = {img["id"]: [] for img in gt["images"]}
    for a in gt["annotations"]:
        if not a["iscrowd"]:
            by_img[a["image_id"]].append(a)
    ids, dets = [], []
    for iid, anns in by_img.items():
        ids.append(iid)
        boxes = torch.tensor(
            [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float64
        )
        dets.append(
            {
                "boxes": boxes.reshape(-1, 4),
                "labels": torch.tensor([cat_ids.index(a["category_id"]) for a in anns], dtype=torch.long),
                "scores": torch.full((len(anns),), 0.75),
            }
        )
    res = detections_to_coco(torch.tensor(ids), dets, cat_ids)
    assert len(res) == sum(len(v) for v in by_img.values())
    assert all(isinstance(v, float) for d in res for v in d["bbox"]) and isinstance(res[0]["image_id"], int)
    assert coco_evaluate(gt, res).metrics["AP"] == pytest.approx(100.0, abs=1e-6)
    with pytest.raises(ValueError, match="must match"):
        detections_to_coco(
            [1], [{"boxes": torch.zeros(2, 4), "labels": torch.zeros(1), "scores": torch.zeros(2)}], cat_ids
        )


def test_report_plots_and_tables(tmp_path):
    gt = _gt()
    r = coco_evaluate(gt, _dets(gt))
    plot_pr_curve(r, tmp_path / "plots" / "pr.png")
    write_per_class_table(r, tmp_path / "per_class.md", tmp_path / "per_class.csv")
    write_pr_curve_csv(r, tmp_path / "pr_curve.csv")
    assert Image.open(tmp_path / "plots" / "pr.png").size[0] > 100
    pr = list(csv.DictReader((tmp_path / "pr_curve.csv").open()))
    assert len(pr) == 101 and float(pr[0]["recall"]) == 0.0 and float(pr[-1]["recall"]) == 1.0
    assert float(pr[0]["precision_iou50"]) == pytest.approx(float(r.precision_iou50[0]), abs=1e-6)
    md = (tmp_path / "per_class.md").read_text()
    assert "circle" in md and "| category_id |" in md
    rows = list(csv.DictReader((tmp_path / "per_class.csv").open()))
    assert [int(row["category_id"]) for row in rows] == [3, 8, 11]
    assert float(rows[0]["AP"]) == pytest.approx(r.per_class[0]["AP"])
    assert not list(tmp_path.rglob("*.tmp*"))

    img = torch.zeros(3, 64, 80, dtype=torch.uint8)
    out = draw_detections(
        img,
        boxes=torch.tensor(
            [[5.0, 5.0, 30.0, 30.0], [70.0, 50.0, 200.0, 90.0], [1.0, 1.0, 2.0, 2.0]]
        ),  # 2nd off-image
        labels=torch.tensor([0, 2, 1]),
        scores=torch.tensor([0.9, 0.8, 0.1]),  # 3rd below the threshold
        gt_boxes=torch.tensor([[4.0, 4.0, 31.0, 31.0]]),
        gt_labels=torch.tensor([0]),
        names=["circle", "square", "triangle"],
        score_thresh=0.3,
    )
    assert out.dtype == torch.uint8 and out.shape == img.shape and out.sum() > 0 and img.sum() == 0
    empty = draw_detections(img, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0))
    assert torch.equal(empty, img)
    save_grid([out, empty, torch.full((3, 40, 40), 255, dtype=torch.uint8)], tmp_path / "grid.png", nrow=2)
    w, h = Image.open(tmp_path / "grid.png").size
    assert w == 2 * 80 + 3 * 2 and h == 2 * 64 + 3 * 2
