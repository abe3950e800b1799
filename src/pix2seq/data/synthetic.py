"""A deterministic COCO-format dataset of coloured shapes on textured backgrounds.

Used offline by the demo, the tests and the benchmarks. Each category is a shape (circle, square,
triangle, ...); every object gets a random colour, so the class must be read from the shape. The
output is laid out exactly like COCO::

    <root>/<split>/<id:012d>.jpg
    <root>/annotations/instances_<split>.json

Generation is a pure function of the config and the split: image ``i`` of a split always has the
same pixels and boxes, whatever else changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from pix2seq.atomic import atomic_write_text, replace_dir
from pix2seq.config import GENERATED_MAX_CLASSES, ConfigError, GeneratedDataConfig

SHAPES = ["circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon", "bar", "half-disc"]
MAX_CLASSES = len(SHAPES)
assert MAX_CLASSES == GENERATED_MAX_CLASSES, "config.GENERATED_MAX_CLASSES must count SHAPES"
_SPLIT_SEED = {"train": 1, "val": 2}


def _texture(rng: np.random.Generator, size: int) -> Image.Image:
    """A muted background that is not flat: low-frequency tinted noise, grain and faint stripes.

    Low saturation and contrast keep the (saturated) objects salient, so the model spends its
    budget on shapes rather than on telling objects from a busy background.
    """
    cells = int(rng.integers(3, 9))
    grey = rng.uniform(70, 170, size=(cells, cells, 1))
    tint = rng.uniform(-18, 18, size=(1, 1, 3))
    base = (grey + tint).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img).astype(np.float32)
    arr += rng.normal(0, 6, size=arr.shape)  # grain
    period = rng.uniform(6, 24)
    angle = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    arr += 6 * stripes[..., None]
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated colour (random hue, high saturation, mid-to-high value)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.7, 1.0), rng.uniform(0.55, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: tuple) -> None:
    """Draw ``shape`` so that it touches all four sides of ``box`` (x0, y0, x1, y1), inclusive."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
    elif shape == "cross":
        t = max(2, int(round(min(w, h) / 3)))
        draw.rectangle((x0, cy - t / 2, x1, cy + t / 2), fill=colour)
        draw.rectangle((cx - t / 2, y0, cx + t / 2, y1), fill=colour)
    elif shape == "ring":
        t = max(2, int(round(min(w, h) / 5)))
        draw.ellipse(box, outline=colour, width=t)
    elif shape == "star":
        draw.polygon(_star(box), fill=colour)
    elif shape == "hexagon":
        draw.polygon(
            [(x0, cy), (x0 + w / 4, y0), (x1 - w / 4, y0), (x1, cy), (x1 - w / 4, y1), (x0 + w / 4, y1)],
            fill=colour,
        )
    elif shape == "bar":
        t = max(2, int(round(h / 3)))
        draw.rectangle((x0, y0, x1, y0 + t), fill=colour)
        draw.rectangle((x0, y1 - t, x1, y1), fill=colour)
        draw.rectangle((x0, y0, x0 + t, y1), fill=colour)
    elif shape == "half-disc":
        # the left half of an ellipse twice as wide as the box fills the box edge to edge
        draw.chord((x0, y0, x1 + w, y1), 90, 270, fill=colour)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)


def _star(box: tuple[int, int, int, int]) -> list:
    """A 4-pointed star whose points touch the box's four sides."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    iw, ih = (x1 - x0) / 6, (y1 - y0) / 6
    return [
        (cx, y0),
        (cx + iw, cy - ih),
        (x1, cy),
        (cx + iw, cy + ih),
        (cx, y1),
        (cx - iw, cy + ih),
        (x0, cy),
        (cx - iw, cy - ih),
    ]


def _iou(a: tuple, b: tuple) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def render_image(cfg: GeneratedDataConfig, split: str, index: int) -> tuple[Image.Image, list[dict]]:
    """Image ``index`` of ``split`` and its objects [{'bbox': [x, y, w, h], 'label': c}, ...]."""
    rng = np.random.default_rng([cfg.seed, _SPLIT_SEED.get(split, 3), index])
    size = cfg.image_size
    img = _texture(rng, size)
    draw = ImageDraw.Draw(img)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    placed: list[tuple] = []
    objects = []
    for _ in range(n):
        for _try in range(30):  # rejection sampling keeps objects from hiding each other
            w = int(rng.integers(cfg.min_object_size, cfg.max_object_size + 1))
            aspect = rng.uniform(0.7, 1.4)
            h = int(np.clip(round(w * aspect), cfg.min_object_size, cfg.max_object_size))
            x0 = int(rng.integers(0, size - w))
            y0 = int(rng.integers(0, size - h))
            box = (x0, y0, x0 + w, y0 + h)
            if all(_iou(box, p) < 0.05 for p in placed):
                break
        else:
            continue
        label = int(rng.integers(0, cfg.num_classes))
        colour = _colour(rng)
        # inclusive pixel box (x0..x0+w-1): the object covers exactly w x h pixels
        _draw_shape(draw, SHAPES[label], (box[0], box[1], box[2] - 1, box[3] - 1), colour)
        placed.append(box)
        objects.append({"bbox": [float(x0), float(y0), float(w), float(h)], "label": label})
    img = img.filter(ImageFilter.GaussianBlur(radius=0.4))
    return img, objects


def _split_kind(split: str) -> str:
    return "val" if "val" in split else "train"


def _fingerprint(cfg: GeneratedDataConfig, split: str, count: int) -> str:
    blob = json.dumps({"cfg": asdict(cfg), "split": split, "count": count, "version": 2}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_split(cfg: GeneratedDataConfig, root: Path, split: str, count: int) -> Path:
    """Write ``count`` images of ``split`` and their COCO json; returns the annotation path.

    Idempotent: a split whose json records the same fingerprint is left as it is. Images go to a
    temporary directory that replaces the split directory only when complete.
    """
    if cfg.num_classes > MAX_CLASSES:
        raise ConfigError(
            f"data.generated.num_classes: at most {MAX_CLASSES} shapes exist, got {cfg.num_classes}"
        )
    root = Path(root)
    ann_path = root / "annotations" / f"instances_{split}.json"
    fp = _fingerprint(cfg, split, count)
    if ann_path.exists() and (root / split).is_dir():
        try:
            if json.loads(ann_path.read_text()).get("info", {}).get("fingerprint") == fp:
                return ann_path
        except json.JSONDecodeError:
            pass
    tmp_dir = root / f".{split}.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    kind = _split_kind(split)
    images, annotations = [], []
    for i in tqdm(range(count), desc=f"generate {split}", unit="img", leave=False, disable=count < 500):
        img, objects = render_image(cfg, kind, i)
        image_id = i + 1
        name = f"{image_id:012d}.jpg"
        img.save(tmp_dir / name, quality=92)
        images.append({"id": image_id, "file_name": name, "width": cfg.image_size, "height": cfg.image_size})
        for obj in objects:
            x, y, w, h = obj["bbox"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj["label"] + 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": "Stable-Pix2Seq generated shapes", "fingerprint": fp},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": c + 1, "name": SHAPES[c], "supercategory": "shape"} for c in range(cfg.num_classes)
        ],
    }
    replace_dir(tmp_dir, root / split)
    atomic_write_text(ann_path, json.dumps(coco))
    return ann_path


def write_generated_dataset(
    cfg: GeneratedDataConfig, root: Path, train_split: str = "train2017", val_split: str = "val2017"
) -> None:
    """Both splits of the generated dataset under ``root`` (idempotent)."""
    write_split(cfg, root, train_split, cfg.num_train)
    write_split(cfg, root, val_split, cfg.num_val)
