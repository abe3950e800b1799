"""COCO box evaluation with faster-coco-eval (default, C++) or pycocotools (the reference).

Both backends run the same protocol (101 recall points, IoU 0.50:0.05:0.95, area ranges
small/medium/large, maxDets 1/10/100) and agree to floating-point precision.

Conventions of :class:`CocoResult`:

- metrics and per-class APs are on a 0-100 scale;
- ``-1.0`` (not scaled) means *undefined*: no ground truth in that slice (e.g. ``APs`` on a
  dataset without small objects, or a category without any annotation). It is COCO's own
  convention and stays a valid JSON number for DVC metrics files;
- precision curves are on 0-1 and sampled at ``recall_thresholds`` (0, 0.01, ..., 1).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["METRIC_NAMES", "CocoResult", "coco_evaluate", "detections_to_coco", "load_coco_gt"]

# COCOeval.stats order (bbox / segm).
METRIC_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)

Backend = Literal["faster_coco_eval", "pycocotools"]


@dataclass
class CocoResult:
    """What :func:`coco_evaluate` returns. See the module docstring for scales and ``-1``."""

    metrics: dict[str, float]
    per_class: list[dict[str, Any]]  # {category_id, name, AP, AP50, AP75, num_gt, num_dets}
    recall_thresholds: np.ndarray  # (R,) 0..1
    precision_iou50: np.ndarray  # (R,) mean over categories with ground truth, IoU 0.5
    precision_mean: np.ndarray  # (R,) mean over categories and IoU 0.50:0.95
    precision_per_class_iou50: np.ndarray  # (K, R), -1 where the category has no ground truth
    category_ids: list[int]
    img_ids: list[int]
    backend: str
    num_detections: int
    summary: str = ""  # COCOeval's printed table
    precision: np.ndarray | None = field(default=None, repr=False)  # raw (T,R,K,A,M), area=all..

    @property
    def ap(self) -> float:
        return self.metrics["AP"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: metrics, per-class table and the two mean PR curves."""
        return {
            "backend": self.backend,
            "num_images": len(self.img_ids),
            "num_detections": self.num_detections,
            "metrics": dict(self.metrics),
            "per_class": [dict(c) for c in self.per_class],
            "pr_curve": {
                "recall": [float(r) for r in self.recall_thresholds],
                "precision_iou50": [float(p) for p in self.precision_iou50],
                "precision_mean": [float(p) for p in self.precision_mean],
            },
        }


# ------------------------------------------------------------------------------------------ GT


def load_coco_gt(gt: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A private, normalised copy of a COCO ground-truth dataset (path or dict).

    Fills what COCOeval needs but some exports omit: ``area`` (w*h), ``iscrowd`` (0), annotation
    ``id`` (1..N) and ``info``. The caller's dict is never modified.
    """
    if isinstance(gt, Mapping):
        data = copy.deepcopy(dict(gt))
    else:
        p = Path(gt)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{p}: ground-truth annotation file not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON: {e}") from None
    for key in ("images", "categories"):
        if key not in data:
            raise ValueError(f"ground truth has no '{key}' list")
    data.setdefault("annotations", [])
    data.setdefault("info", {})
    for i, ann in enumerate(data["annotations"], start=1):
        ann.setdefault("id", i)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            _, _, w, h = ann["bbox"]
            ann["area"] = float(w) * float(h)
    return data


# ------------------------------------------------------------------------------------ backends


def _run_faster(
    gt: dict[str, Any], dets: list[dict[str, Any]], iou_type: str, img_ids: list[int]
) -> tuple[Any, str]:
    from faster_coco_eval import COCO, COCOeval_faster

    lines: list[str] = []
    coco_gt = COCO(gt)  # shallow-copies the (already private) dict
    coco_gt.print_function = log.debug
    coco_dt = coco_gt.loadRes(dets)
    ev = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, print_function=lines.append)
    ev.params.imgIds = img_ids
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    summary = "\n".join(line for line in lines if line.lstrip().startswith("Average"))
    return ev, summary


def _run_pycocotools(
    gt: dict[str, Any], dets: list[dict[str, Any]], iou_type: str, img_ids: list[int]
) -> tuple[Any, str]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if dets:
            coco_dt = coco_gt.loadRes(dets)
        else:  # pycocotools.loadRes indexes anns[0]
            coco_dt = COCO()
            coco_dt.dataset = {
                "info": {},
                "images": list(gt["images"]),
                "categories": copy.deepcopy(gt["categories"]),
                "annotations": [],
            }
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        mark = buf.tell()
        ev.summarize()
    summary = buf.getvalue()[mark:].rstrip("\n")
    return ev, summary


# ------------------------------------------------------------------------------------ evaluate


def _mean_valid(a: np.ndarray, axis: tuple[int, ...]) -> np.ndarray:
    """Mean over ``axis`` of the entries > -1; -1 where none are."""
    valid = a > -1
    total = np.where(valid, a, 0.0).sum(axis=axis)
    count = valid.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(count > 0, total / np.maximum(count, 1), -1.0)
    return out


def _scaled(x: float) -> float:
    x = float(x)
    if math.isnan(x) or x <= -1 + 1e-12:
        return -1.0
    return 100.0 * x


def coco_evaluate(
    gt: str | os.PathLike[str] | Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    backend: Backend = "faster_coco_eval",
    iou_type: Literal["bbox"] = "bbox",
    img_ids: Sequence[int] | None = None,
) -> CocoResult:
    """COCO metrics of ``detections`` against ``gt``.

    Args:
        gt: a COCO annotation file or dict (never modified).
        detections: COCO result dicts ``{image_id, category_id, bbox: [x, y, w, h], score}`` in the
            ground truth's pixel frame (e.g. from :func:`detections_to_coco`). May be empty.
        backend: ``"faster_coco_eval"`` (fast, default) or ``"pycocotools"`` (reference).
        iou_type: only ``"bbox"`` is supported.
        img_ids: evaluate only these images (e.g. the subset that was actually decoded);
            detections on other images are ignored. Default: every image in ``gt``.

    Raises:
        ValueError: unknown backend/iou_type, a detection on an image that is not in ``gt``, or
            ``img_ids`` naming images that are not in ``gt``.
    """
    if iou_type != "bbox":
        raise ValueError(f"iou_type: only 'bbox' is supported, got {iou_type!r}")
    if backend not in ("faster_coco_eval", "pycocotools"):
        raise ValueError(f"backend: must be 'faster_coco_eval' or 'pycocotools', got {backend!r}")

    data = load_coco_gt(gt)
    gt_img_ids = {int(im["id"]) for im in data["images"]}
    if img_ids is None:
        eval_ids = sorted(gt_img_ids)
    else:
        eval_ids = sorted({int(i) for i in img_ids})
        missing = [i for i in eval_ids if i not in gt_img_ids]
        if missing:
            raise ValueError(
                f"img_ids: {len(missing)} image id(s) not in the ground truth, e.g. {missing[:5]}"
            )
    eval_set = set(eval_ids)

    dets: list[dict[str, Any]] = []
    unknown: set[int] = set()
    for d in detections:
        iid = int(d["image_id"])
        if iid not in gt_img_ids:
            unknown.add(iid)
            continue
        if iid not in eval_set:
            continue
        x, y, w, h = (float(v) for v in d["bbox"])
        dets.append(
            {
                "image_id": iid,
                "category_id": int(d["category_id"]),
                "bbox": [x, y, w, h],
                "score": float(d["score"]),
            }
        )
    if unknown:
        raise ValueError(
            f"detections: {len(unknown)} image id(s) are not in the ground truth, e.g. {sorted(unknown)[:5]}"
        )

    runner = _run_faster if backend == "faster_coco_eval" else _run_pycocotools
    ev, summary = runner(data, dets, iou_type, eval_ids)

    stats = np.asarray(ev.stats, dtype=np.float64)[: len(METRIC_NAMES)]
    metrics = {name: _scaled(v) for name, v in zip(METRIC_NAMES, stats, strict=True)}

    precision = np.asarray(ev.eval["precision"], dtype=np.float64)  # (T, R, K, A, M)
    p = ev.params
    iou_thrs = np.asarray(p.iouThrs, dtype=np.float64)
    rec_thrs = np.asarray(p.recThrs, dtype=np.float64)
    cat_ids = [int(c) for c in p.catIds]
    a_all = list(p.areaRngLbl).index("all")
    m_last = len(p.maxDets) - 1
    t50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
    t75 = int(np.argmin(np.abs(iou_thrs - 0.75)))
    pa = precision[:, :, :, a_all, m_last]  # (T, R, K)

    per_class_iou50 = pa[t50].T.copy()  # (K, R)
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
    num_gt: dict[int, int] = {c: 0 for c in cat_ids}
    for ann in data["annotations"]:
        if int(ann["image_id"]) in eval_set and not ann.get("iscrowd", 0):
            cid = int(ann["category_id"])
            if cid in num_gt:
                num_gt[cid] += 1
    num_dets: dict[int, int] = {c: 0 for c in cat_ids}
    for d in dets:
        if d["category_id"] in num_dets:
            num_dets[d["category_id"]] += 1

    per_class = []
    for k, cid in enumerate(cat_ids):
        per_class.append(
            {
                "category_id": cid,
                "name": names.get(cid, str(cid)),
                "AP": _scaled(_mean_valid(pa[:, :, k], (0, 1))),
                "AP50": _scaled(_mean_valid(pa[t50, :, k], (0,))),
                "AP75": _scaled(_mean_valid(pa[t75, :, k], (0,))),
                "num_gt": num_gt[cid],
                "num_dets": num_dets[cid],
            }
        )

    return CocoResult(
        metrics=metrics,
        per_class=per_class,
        recall_thresholds=rec_thrs,
        precision_iou50=_mean_valid(pa[t50], (1,)),
        precision_mean=_mean_valid(pa, (0, 2)),
        precision_per_class_iou50=per_class_iou50,
        category_ids=cat_ids,
        img_ids=eval_ids,
        backend=backend,
        num_detections=len(dets),
        summary=summary,
        precision=precision,
    )


# ---------------------------------------------------------------------------------- conversion


def _as_list(x: Any) -> list[Any]:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().tolist()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return list(x)


def detections_to_coco(
    image_ids: Sequence[int] | torch.Tensor,
    dets: Sequence[Mapping[str, Any]],
    label_to_category_id: Sequence[int] | Mapping[int, int],
) -> list[dict[str, Any]]:
    """Per-image ``{"boxes": (M,4) xyxy, "labels": (M,), "scores": (M,)}`` -> COCO result dicts.

    ``boxes`` must already be in the original image's pixels (what ``tokens_to_detections``
    returns). ``label_to_category_id[label]`` maps contiguous labels 0..C-1 to COCO category ids.
    """
    ids = [int(i) for i in _as_list(image_ids)]
    if len(ids) != len(dets):
        raise ValueError(f"detections_to_coco: {len(ids)} image ids but {len(dets)} detection sets")
    out: list[dict[str, Any]] = []
    for iid, d in zip(ids, dets, strict=True):
        boxes = _as_list(d["boxes"])
        labels = _as_list(d["labels"])
        scores = _as_list(d["scores"])
        if not (len(boxes) == len(labels) == len(scores)):
            raise ValueError(
                f"image {iid}: {len(boxes)} boxes, {len(labels)} labels, {len(scores)} scores (must match)"
            )
        for (x0, y0, x1, y1), lab, s in zip(boxes, labels, scores, strict=True):
            out.append(
                {
                    "image_id": iid,
                    "category_id": int(label_to_category_id[int(lab)]),
                    "bbox": [float(x0), float(y0), float(x1) - float(x0), float(y1) - float(y0)],
                    "score": float(s),
                }
            )
    return out
