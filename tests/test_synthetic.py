"""The generated COCO-format dataset: deterministic, COCO-shaped, boxes frame the shapes."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from pix2seq.config import GeneratedDataConfig
from pix2seq.data.synthetic import render_image, write_split


def test_layout_and_boxes(tiny_generated):
    root, gcfg = tiny_generated
    coco = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    assert {"images", "annotations", "categories", "info"} <= set(coco)
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3]
    assert len(coco["images"]) == gcfg.num_train
    ids = {im["id"] for im in coco["images"]}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert a["image_id"] in ids and a["iscrowd"] == 0 and 1 <= a["category_id"] <= 3
        assert 0 <= x and 0 <= y and x + w <= gcfg.image_size and y + h <= gcfg.image_size
        assert gcfg.min_object_size <= max(w, h) <= gcfg.max_object_size
    im = coco["images"][0]
    with Image.open(root / "train2017" / im["file_name"]) as img:
        assert img.size == (im["width"], im["height"]) and img.format == "JPEG"


def test_deterministic_and_split_specific():
    cfg = GeneratedDataConfig(image_size=64, num_classes=4, min_object_size=8, max_object_size=24)
    a, oa = render_image(cfg, "train", 3)
    b, ob = render_image(cfg, "train", 3)
    c, _ = render_image(cfg, "val", 3)
    assert oa == ob and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_box_frames_the_shape():
    # a square (class 1) drawn on the texture: the box edges are where the colour changes
    cfg = GeneratedDataConfig(
        image_size=96, num_classes=2, min_objects=1, max_objects=1, min_object_size=20, max_object_size=30
    )
    for i in range(6):
        img, objs = render_image(cfg, "train", i)
        if objs[0]["label"] != 1:
            continue
        x, y, w, h = (int(v) for v in objs[0]["bbox"])
        arr = np.asarray(img).astype(int)
        inner = arr[y + 2 : y + h - 2, x + 2 : x + w - 2].reshape(-1, 3)
        assert inner.std(0).max() < 12  # one flat colour inside (JPEG-free: rendered directly)


def test_idempotent(tmp_path):
    cfg = GeneratedDataConfig(image_size=48, num_train=5, num_val=2, min_object_size=6, max_object_size=16)
    p = write_split(cfg, tmp_path, "val2017", 4)
    stamp = (tmp_path / "val2017" / "000000000001.jpg").stat().st_mtime_ns
    write_split(cfg, tmp_path, "val2017", 4)
    assert (tmp_path / "val2017" / "000000000001.jpg").stat().st_mtime_ns == stamp
    write_split(cfg, tmp_path, "val2017", 3)  # another size: rewritten
    assert len(list((tmp_path / "val2017").iterdir())) == 3
    assert len(json.loads(p.read_text())["images"]) == 3
    assert not list(tmp_path.glob(".*"))
