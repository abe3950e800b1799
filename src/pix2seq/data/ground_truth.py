"""The evaluation ground truth of a prepared split, in COCO format, built from its manifest.

Evaluation (during training and in the evaluate stage) scores against this, never against the raw
annotation file: what prepare dropped (malformed entries, boxes outside the image or under
``data.prepare.min_box_size``, bad images) is not ground truth, what it clamped is clamped here too,
and a malformed entry in the raw file cannot reach the evaluator. COCO's own fields are kept: each
box's ``area`` (COCO's, the segment's, which decides APs/APm/APl), and the crowd and ``ignore``
regions with their ``iscrowd``/``ignore`` flags, so COCO counts them as it would on the raw file.
Annotation ids are renumbered 1..N (the raw file's may repeat).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pix2seq.data.prepare import read_manifest_json


def _box_entry(box: list[float], category_id: int, area: float | None) -> dict[str, Any]:
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    w, h = x1 - x0, y1 - y0
    return {"category_id": category_id, "bbox": [x0, y0, w, h], "area": float(area if area else w * h)}


def coco_ground_truth(manifest: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A COCO ground-truth dict (``images``, ``annotations``, ``categories``) from a prepared
    manifest (its path or its dict): the kept boxes with ``iscrowd: 0``, then the crowd and
    ``ignore`` regions with ``ignore: 1``."""
    data = dict(manifest) if isinstance(manifest, Mapping) else read_manifest_json(manifest)
    categories = [{"id": int(c["id"]), "name": str(c["name"])} for c in data["categories"]]
    cat_of_label = [c["id"] for c in categories]
    n = len(data["images"])
    areas = data.get("areas") or [[None] * len(b) for b in data["boxes"]]  # version 1: box areas
    ignored = data.get("ignored") or [[] for _ in range(n)]
    images, annotations = [], []
    for k, (iid, file, width, height) in enumerate(data["images"]):
        images.append({"id": int(iid), "file_name": str(file), "width": int(width), "height": int(height)})
        for box, label, area in zip(data["boxes"][k], data["labels"][k], areas[k], strict=True):
            ann = _box_entry(box, cat_of_label[int(label)], area)
            annotations.append({"image_id": int(iid), **ann, "iscrowd": 0, "ignore": 0})
        for x0, y0, x1, y1, label, area, crowd in ignored[k]:
            ann = _box_entry([x0, y0, x1, y1], cat_of_label[int(label)], area)
            annotations.append({"image_id": int(iid), **ann, "iscrowd": int(crowd), "ignore": 1})
    for i, ann in enumerate(annotations, start=1):
        ann["id"] = i
    return {"info": {"split": data.get("split", "")}, "images": images, "annotations": annotations,
            "categories": categories}  # fmt: skip
