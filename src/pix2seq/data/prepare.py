"""The ``prepare`` stage: validate a COCO-format dataset and write the manifests training reads.

For each split (``<root>/annotations/instances_<split>.json`` + ``<root>/<split>/``):

- every image must exist, decode (``data.prepare.check_images``) and have the size its entry
  states; bad images are excluded and counted, and the stage fails only when more than
  ``data.prepare.max_bad_fraction`` of a split is bad;
- crowd annotations are dropped; boxes are clamped to the image; boxes narrower or shorter than
  ``data.prepare.min_box_size`` (including boxes entirely outside the image) are dropped;
  annotations with unknown category or image ids, or malformed fields, are dropped with a message
  naming the file, the annotation id and the field;
- categories map to contiguous labels ``0..C-1`` sorted by category id (the union over splits).

Outputs (all written atomically):

- ``<prepared_dir>/<split>.json``, the manifest::

    {"format": "pix2seq-manifest", "version": 1, "split": ..., "root": ...,
     "categories": [{"id": 1, "name": "person"}, ...],            # label = position
     "images": [[image_id, "<split>/<file_name>", width, height], ...],
     "boxes":  [[[x0, y0, x1, y1], ...], ...],                    # per image, original pixels
     "labels": [[label, ...], ...]}                                # per image

- ``<prepared_dir>/issues.json``: every message, per split (capped);
- the report (``reports/prepare.json``, a DVC metric): kept/dropped counts by reason, per split.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from tqdm import tqdm

from pix2seq.config import Config, PrepareConfig, atomic_write_text

log = logging.getLogger(__name__)

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec (not a dependency here); they
# still work and are the fast path, so the per-call DeprecationWarning is silenced for them only.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision",
    category=DeprecationWarning,
)

MANIFEST_FORMAT = "pix2seq-manifest"
MANIFEST_VERSION = 1
MAX_ISSUES = 1000  # messages kept per split in issues.json
MAX_LOGGED = 20  # messages printed per split and reason

IMAGE_REASONS = ("missing", "corrupt", "size_mismatch", "malformed", "duplicate_id")
BOX_REASONS = (
    "crowd",
    "degenerate",
    "outside_image",
    "unknown_category",
    "unknown_image",
    "malformed",
    "bad_image",
)


class PrepareError(RuntimeError):
    """The dataset cannot be prepared; the message names the file (and field / annotation id)."""


# ------------------------------------------------------------------------------------- reading


def annotation_path(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def load_coco_json(path: Path) -> dict[str, Any]:
    """Read and structurally check a COCO instances file; errors name the file and field."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise PrepareError(f"{path}: annotation file not found") from None
    except json.JSONDecodeError as e:
        raise PrepareError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(data, dict):
        raise PrepareError(f"{path}: the top level must be an object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise PrepareError(f"{path}: missing field '{key}'")
        if not isinstance(data[key], list):
            raise PrepareError(f"{path}: field '{key}' must be a list, got {type(data[key]).__name__}")
    return data


def collect_categories(files: list[tuple[Path, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The union of the files' categories, sorted by id: ``[{"id", "name"}]`` (label = position)."""
    by_id: dict[int, tuple[str, Path]] = {}
    for path, coco in files:
        for i, c in enumerate(coco["categories"]):
            if not isinstance(c, dict) or "id" not in c:
                raise PrepareError(f"{path}: categories[{i}]: missing field 'id'")
            cid = c["id"]
            if isinstance(cid, bool) or not isinstance(cid, int):
                raise PrepareError(f"{path}: categories[{i}].id must be an integer, got {cid!r}")
            name = str(c.get("name", cid))
            if cid in by_id and by_id[cid][0] != name:
                raise PrepareError(
                    f"{path}: category id {cid} is named {name!r} here but {by_id[cid][0]!r} in {by_id[cid][1]}"
                )
            by_id.setdefault(cid, (name, path))
    if not by_id:
        raise PrepareError(f"{', '.join(str(p) for p, _ in files)}: no categories")
    return [{"id": cid, "name": by_id[cid][0]} for cid in sorted(by_id)]


# -------------------------------------------------------------------------------- image checks


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() >= 3 and int(data[0]) == 0xFF and int(data[1]) == 0xD8 and int(data[2]) == 0xFF


def read_image_size(path: Path, decode: bool) -> tuple[int, int]:
    """(height, width) of an image file; ``decode=True`` fully decodes it (catches truncation)."""
    if decode:
        data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
        if data.numel() == 0:
            raise ValueError("empty file")
        img = (
            decode_jpeg(data, mode=ImageReadMode.RGB)
            if _is_jpeg(data)
            else decode_image(data, mode=ImageReadMode.RGB)
        )
        return int(img.shape[-2]), int(img.shape[-1])
    from PIL import Image  # header only

    with Image.open(path) as im:
        w, h = im.size
    return h, w


def check_image(path: Path, width: int, height: int, decode: bool) -> tuple[str, str] | None:
    """None when ``path`` is a good ``width x height`` image, else (reason, message)."""
    if not path.is_file():
        return "missing", f"{path}: image file not found"
    try:
        h, w = read_image_size(path, decode)
    except Exception as e:  # noqa: BLE001 - any decoder error means a bad file
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        return "corrupt", f"{path}: cannot decode ({msg})"
    if (h, w) != (height, width):
        return "size_mismatch", f"{path}: decoded size {w}x{h} differs from the annotation's {width}x{height}"
    return None


# --------------------------------------------------------------------------------------- split


@dataclass
class SplitResult:
    manifest: dict[str, Any]
    report: dict[str, Any]
    issues: list[str] = field(default_factory=list)


def _num(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v)


def prepare_split(
    root: Path,
    split: str,
    categories: list[dict[str, Any]],
    pcfg: PrepareConfig,
    coco: dict[str, Any] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> SplitResult:
    """Validate one split; returns its manifest, report and messages (nothing is written)."""
    root = Path(root)
    ann_path = annotation_path(root, split)
    if coco is None:
        coco = load_coco_json(ann_path)
    img_dir = root / split
    if not img_dir.is_dir():
        raise PrepareError(
            f"{img_dir}: images directory missing for split {split!r} (with data.download.subset 'val', "
            "use data.train_split: val2017)"
        )
    issues: list[str] = []
    logged: Counter[str] = Counter()
    bad_images: Counter[str] = Counter()
    dropped: Counter[str] = Counter()

    def issue(kind: str, msg: str) -> None:
        if len(issues) < MAX_ISSUES:
            issues.append(msg)
        logged[kind] += 1
        if logged[kind] <= MAX_LOGGED:
            log.warning("%s", msg)
        elif logged[kind] == MAX_LOGGED + 1:
            log.warning(
                "%s: more '%s' problems; all are counted in the report and listed in issues.json",
                ann_path,
                kind,
            )

    # images
    images: dict[int, dict[str, Any]] = {}
    order: list[int] = []
    for i, im in enumerate(coco["images"]):
        iid = im.get("id") if isinstance(im, dict) else None
        where = f"{ann_path}: images[{i}]" + (f" (id {iid})" if iid is not None else "")
        if not isinstance(im, dict):
            bad_images["malformed"] += 1
            issue("image_malformed", f"{where}: not an object")
            continue
        problem = None
        for key in ("id", "file_name", "width", "height"):
            if key not in im:
                problem = f"missing field '{key}'"
                break
        if problem is None and (isinstance(iid, bool) or not isinstance(iid, int)):
            problem = f"field 'id' must be an integer, got {iid!r}"
        if problem is None and (
            not isinstance(im["file_name"], str)
            or not im["file_name"]
            or im["file_name"].startswith(("/", "\\"))
            or ".." in im["file_name"].replace("\\", "/").split("/")
        ):
            problem = f"field 'file_name' must be a relative path inside the split, got {im['file_name']!r}"
        if problem is None:
            for key in ("width", "height"):
                v = im[key]
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    problem = f"field '{key}' must be a positive integer, got {v!r}"
                    break
        if problem is not None:
            bad_images["malformed"] += 1
            issue("image_malformed", f"{where}: {problem}")
            continue
        if iid in images:
            bad_images["duplicate_id"] += 1
            issue("image_duplicate", f"{where}: duplicate image id {iid}; the later entry is ignored")
            continue
        images[iid] = im
        order.append(iid)
    n_entries = len(coco["images"])

    # decode-check the images (threads: decoding and file reads release the GIL)
    bad_ids: set[int] = set()
    nw = workers if workers is not None else min(16, (os.cpu_count() or 1) + 2)
    paths = [img_dir / images[iid]["file_name"] for iid in order]

    def task(k: int) -> tuple[str, str] | None:
        im = images[order[k]]
        return check_image(paths[k], im["width"], im["height"], pcfg.check_images)

    desc = f"check {split}" if pcfg.check_images else f"stat {split}"
    with ThreadPoolExecutor(max_workers=max(1, nw)) as pool:
        results = pool.map(task, range(len(order)), chunksize=16)
        for k, res in enumerate(tqdm(results, total=len(order), desc=desc, unit="img", disable=not progress)):
            if res is not None:
                reason, msg = res
                bad_images[reason] += 1
                bad_ids.add(order[k])
                issue(f"image_{reason}", msg)

    # annotations
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    boxes: dict[int, list[list[float]]] = {iid: [] for iid in order if iid not in bad_ids}
    labels: dict[int, list[int]] = {iid: [] for iid in boxes}
    n_ann = len(coco["annotations"])
    clamped = 0
    min_size = pcfg.min_box_size
    for i, a in enumerate(coco["annotations"]):
        aid = a.get("id", f"#{i}") if isinstance(a, dict) else f"#{i}"
        where = f"{ann_path}: annotation {aid}"
        if not isinstance(a, dict):
            dropped["malformed"] += 1
            issue("box_malformed", f"{where}: not an object")
            continue
        missing = next((k for k in ("image_id", "category_id", "bbox") if k not in a), None)
        if missing:
            dropped["malformed"] += 1
            issue("box_malformed", f"{where}: missing field '{missing}'")
            continue
        bbox = a["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_num(v) for v in bbox):
            dropped["malformed"] += 1
            issue(
                "box_malformed", f"{where}: field 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}"
            )
            continue
        iid = a["image_id"]
        if isinstance(iid, bool) or not isinstance(iid, int) or iid not in images:
            dropped["unknown_image"] += 1
            issue("box_unknown_image", f"{where}: field 'image_id' {iid!r} is not in images")
            continue
        cid = a["category_id"]
        if isinstance(cid, bool) or not isinstance(cid, int) or cid not in label_of:
            dropped["unknown_category"] += 1
            issue(
                "box_unknown_category",
                f"{where}: field 'category_id' {cid!r} is not a known category (image {iid})",
            )
            continue
        if a.get("iscrowd", 0):
            dropped["crowd"] += 1
            continue
        if iid in bad_ids:
            dropped["bad_image"] += 1
            continue
        im = images[iid]
        W, H = im["width"], im["height"]
        x, y, w, h = (float(v) for v in bbox)
        x0, y0, x1, y1 = x, y, x + w, y + h
        if w > 0 and h > 0 and (x1 <= 0 or y1 <= 0 or x0 >= W or y0 >= H):
            dropped["outside_image"] += 1
            issue("box_outside", f"{where}: box {bbox} lies outside the {W}x{H} image {iid}")
            continue
        cx0, cy0 = min(max(x0, 0.0), W), min(max(y0, 0.0), H)
        cx1, cy1 = min(max(x1, 0.0), W), min(max(y1, 0.0), H)
        if cx1 - cx0 < min_size or cy1 - cy0 < min_size:
            dropped["degenerate"] += 1
            issue(
                "box_degenerate",
                f"{where}: box {bbox} is smaller than data.prepare.min_box_size={min_size:g} "
                f"after clamping to the {W}x{H} image {iid}",
            )
            continue
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            clamped += 1
        boxes[iid].append([round(cx0, 3), round(cy0, 3), round(cx1, 3), round(cy1, 3)])
        labels[iid].append(label_of[cid])

    kept_ids = [iid for iid in order if iid not in bad_ids]
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "split": split,
        "root": str(root),
        "categories": categories,
        "images": [
            [iid, f"{split}/{images[iid]['file_name']}", images[iid]["width"], images[iid]["height"]]
            for iid in kept_ids
        ],
        "boxes": [boxes[iid] for iid in kept_ids],
        "labels": [labels[iid] for iid in kept_ids],
    }
    n_bad = sum(bad_images.values())
    n_kept_boxes = sum(len(b) for b in manifest["boxes"])
    report = {
        "images_total": n_entries,
        "images_kept": len(kept_ids),
        "images_bad": n_bad,
        "images_bad_fraction": round(n_bad / n_entries, 6) if n_entries else 0.0,
        "images_bad_by_reason": {r: bad_images.get(r, 0) for r in IMAGE_REASONS},
        "images_without_boxes": sum(1 for b in manifest["boxes"] if not b),
        "boxes_total": n_ann,
        "boxes_kept": n_kept_boxes,
        "boxes_clamped": clamped,
        "boxes_dropped": sum(dropped.values()),
        "boxes_dropped_by_reason": {r: dropped.get(r, 0) for r in BOX_REASONS},
    }
    return SplitResult(manifest, report, issues)


# ------------------------------------------------------------------------------------ the stage


def manifest_path(prepared_dir: str | os.PathLike[str], split: str) -> Path:
    return Path(prepared_dir) / f"{split}.json"


def prepare_dataset(
    root: str | os.PathLike[str],
    splits: list[str],
    out_dir: str | os.PathLike[str],
    report_path: str | os.PathLike[str] | None,
    pcfg: PrepareConfig,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare every split (each once) and write manifests, issues.json and the report.

    Raises :class:`PrepareError` when a split has more bad images than ``pcfg.max_bad_fraction``
    (after writing the report and issues, and without writing that split's manifest).
    """
    root, out_dir = Path(root), Path(out_dir)
    splits = list(dict.fromkeys(splits))
    files = [(annotation_path(root, s), load_coco_json(annotation_path(root, s))) for s in splits]
    categories = collect_categories(files)
    results = {
        s: prepare_split(root, s, categories, pcfg, coco=coco, workers=workers, progress=progress)
        for s, (_, coco) in zip(splits, files, strict=True)
    }
    report: dict[str, Any] = {"num_categories": len(categories)}
    report.update({s: r.report for s, r in results.items()})
    failed = []
    for s, r in results.items():
        rep = r.report
        if rep["images_bad_fraction"] > pcfg.max_bad_fraction:
            reasons = ", ".join(f"{k}: {v}" for k, v in rep["images_bad_by_reason"].items() if v)
            failed.append(
                f"{s}: {rep['images_bad']} of {rep['images_total']} images are bad "
                f"({rep['images_bad_fraction']:.2%} > data.prepare.max_bad_fraction "
                f"{pcfg.max_bad_fraction:.2%}; {reasons})"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out_dir / "issues.json", json.dumps({s: r.issues for s, r in results.items()}, indent=1)
    )
    if report_path is not None:
        atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")
    for s, r in results.items():
        mp = manifest_path(out_dir, s)
        if r.report["images_bad_fraction"] > pcfg.max_bad_fraction:
            mp.unlink(missing_ok=True)
            continue
        atomic_write_text(mp, json.dumps(r.manifest, separators=(",", ":")))
        log.info(
            "%s: %d images (%d bad), %d boxes kept, %d dropped -> %s",
            s,
            r.report["images_kept"],
            r.report["images_bad"],
            r.report["boxes_kept"],
            r.report["boxes_dropped"],
            mp,
        )
    if failed:
        raise PrepareError(
            "too many bad images: " + "; ".join(failed) + f" (details in {out_dir / 'issues.json'})"
        )
    return report


def run_prepare(
    cfg: Config, report_path: str | os.PathLike[str] = "reports/prepare.json", progress: bool = True
) -> dict:
    """The stage: ``data.root`` -> ``data.prepared_dir`` manifests for the train and val splits."""
    d = cfg.data
    return prepare_dataset(
        d.root, [d.train_split, d.val_split], d.prepared_dir, report_path, d.prepare, progress=progress
    )
