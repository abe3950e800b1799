"""The ``prepare`` stage: validate a COCO-format dataset and write the manifests training reads.

For each split (``<root>/annotations/instances_<split>.json`` + ``<root>/<split>/``):

- every image must be a regular file, decode (``data.prepare.check_images``) and have the size its
  entry states; bad images are excluded and counted, and the stage fails when more than
  ``data.prepare.max_bad_fraction`` of a split is bad. An image id two different entries claim is
  excluded with its annotations (they could belong to either file);
- boxes are clamped to the image; boxes with no width or height left (including boxes entirely
  outside the image), or narrower or shorter than ``data.prepare.min_box_size`` when that is set,
  are dropped; annotations with unknown category or image ids, or malformed fields, are dropped with
  a message naming the file, the annotation id and the field; repeated annotation ids are reported
  (an exact repeat is dropped);
- crowd regions (``iscrowd``) and entries flagged ``ignore`` are not trained on but kept, clamped
  the same way, for evaluation (COCO ignores detections on them);
- categories map to contiguous labels ``0..C-1`` sorted by category id (the union over splits);
- the stage fails on a split without images or without boxes, and reports the images with more
  objects than ``tokenizer.max_instances``.

Outputs (all written atomically; a failed run leaves no manifest, not even an earlier one):

- ``<prepared_dir>/<split>.json``, the manifest::

    {"format": "pix2seq-manifest", "version": 2, "split": ..., "root": ...,
     "categories": [{"id": 1, "name": "person"}, ...],            # label = position
     "images": [[image_id, "<split>/<file_name>", width, height], ...],
     "boxes":  [[[x0, y0, x1, y1], ...], ...],                    # per image, original pixels
     "labels": [[label, ...], ...],                                # per image
     "areas":  [[area, ...], ...],                                 # per box: COCO's area (APs/m/l)
     "ignored": [[[x0, y0, x1, y1, label, area, iscrowd], ...], ...]}   # per image: not trained on

  Evaluation scores against the ground truth built from it (:mod:`pix2seq.data.ground_truth`), so
  what prepare drops or clamps is dropped or clamped there too.
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

from pix2seq.atomic import atomic_write_text
from pix2seq.config import Config, PrepareConfig
from pix2seq.errors import Pix2SeqError
from pix2seq.files import FileReadError, open_regular, read_regular

log = logging.getLogger(__name__)

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec (not a dependency here); they
# still work and are the fast path, so the per-call DeprecationWarning is silenced for them only.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision",
    category=DeprecationWarning,
)

MANIFEST_FORMAT = "pix2seq-manifest"
MANIFEST_VERSION = 2
MAX_ISSUES = 1000  # messages kept per split in issues.json
MAX_LOGGED = 20  # messages printed per split and reason

IMAGE_REASONS = ("missing", "unreadable", "corrupt", "size_mismatch", "malformed", "duplicate_id")
BOX_REASONS = (
    "crowd",  # iscrowd regions: not trained on; kept for evaluation, which ignores detections on them
    "ignore",  # entries with COCO's `ignore` flag: the same
    "degenerate",
    "outside_image",
    "unknown_category",
    "unknown_image",
    "ambiguous_image",  # its image id names two different files
    "duplicate",  # an exact repeat of an earlier annotation (same id, image, category and box)
    "malformed",
    "bad_image",
)


class PrepareError(Pix2SeqError, RuntimeError):
    """The dataset cannot be prepared; the message names the file (and field / annotation id)."""


class ManifestError(Pix2SeqError, ValueError):
    """A manifest that is missing or unreadable; the message names it and says to run prepare."""


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


def read_manifest_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest file as a dict; one-line errors naming the file (and the stage to run)."""
    p = Path(path)
    if not p.exists():
        raise ManifestError(f"{p}: manifest not found; run the prepare stage (dvc repro prepare)")
    try:
        data = json.loads(read_regular(p))
    except FileReadError as e:
        raise ManifestError(f"{e}; run the prepare stage (dvc repro prepare)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ManifestError(f"{p}: not valid JSON; run the prepare stage again (dvc repro prepare)") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{p}: not a pix2seq manifest; run the prepare stage (dvc repro prepare)")
    return data


# -------------------------------------------------------------------------------- image checks


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() >= 3 and int(data[0]) == 0xFF and int(data[1]) == 0xD8 and int(data[2]) == 0xFF


def read_image_size(path: Path, decode: bool) -> tuple[int, int]:
    """(height, width) of an image file; ``decode=True`` fully decodes it (catches truncation).

    Only a regular file is read (a FIFO or device in a dataset would block the stage); an empty
    file is reported as such. Raises :class:`FileReadError` when the file cannot be read.
    """
    if decode:
        data = torch.frombuffer(bytearray(read_regular(path)), dtype=torch.uint8)
        img = (
            decode_jpeg(data, mode=ImageReadMode.RGB)
            if _is_jpeg(data)
            else decode_image(data, mode=ImageReadMode.RGB)
        )
        return int(img.shape[-2]), int(img.shape[-1])
    from PIL import Image  # header only

    with open_regular(path) as f:
        if not f.peek(1):
            raise FileReadError(f"{path}: empty file (0 bytes)")
        with Image.open(f) as im:
            w, h = im.size
    return h, w


def check_image(path: Path, width: int, height: int, decode: bool) -> tuple[str, str] | None:
    """None when ``path`` is a good ``width x height`` image, else (reason, message)."""
    if not path.exists() and not path.is_symlink():
        return "missing", f"{path}: image file not found"
    try:
        h, w = read_image_size(path, decode)
    except FileReadError as e:  # permission denied, a FIFO, empty: what happened, not "cannot decode"
        return ("corrupt" if "empty file" in str(e) else "unreadable"), str(e)
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


class _Issues:
    """The messages of one split: every one kept (up to :data:`MAX_ISSUES`), logged up to
    :data:`MAX_LOGGED` per kind, counted by reason."""

    def __init__(self, ann_path: Path) -> None:
        self.ann_path = ann_path
        self.messages: list[str] = []
        self.logged: Counter[str] = Counter()

    def __call__(self, kind: str, msg: str) -> None:
        if len(self.messages) < MAX_ISSUES:
            self.messages.append(msg)
        self.logged[kind] += 1
        if self.logged[kind] <= MAX_LOGGED:
            log.warning("%s", msg)
        elif self.logged[kind] == MAX_LOGGED + 1:
            log.warning(
                "%s: more '%s' problems; all are counted in the report and listed in issues.json",
                self.ann_path,
                kind,
            )


def _image_problem(im: dict[str, Any]) -> str | None:
    """What is wrong with an image entry's fields, or None."""
    for key in ("id", "file_name", "width", "height"):
        if key not in im:
            return f"missing field '{key}'"
    iid = im["id"]
    if isinstance(iid, bool) or not isinstance(iid, int):
        return f"field 'id' must be an integer, got {iid!r}"
    name = im["file_name"]
    if (
        not isinstance(name, str)
        or not name
        or name.startswith(("/", "\\"))
        or ".." in name.replace("\\", "/").split("/")
    ):
        return f"field 'file_name' must be a relative path inside the split, got {name!r}"
    for key in ("width", "height"):
        v = im[key]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            return f"field '{key}' must be a positive integer, got {v!r}"
    return None


@dataclass
class _Images:
    by_id: dict[int, dict[str, Any]]  # the usable entries
    order: list[int]  # their ids, in file order
    bad: Counter[str]  # bad entries by reason
    ambiguous: set[int]  # ids two different entries claim: their boxes belong to no one for sure


def _read_images(coco: dict[str, Any], ann_path: Path, issue: _Issues) -> _Images:
    """Validate the image entries. A repeated id with the same file is ignored; an id that two
    different files claim is dropped with both entries, since its annotations could be either's."""
    images: dict[int, dict[str, Any]] = {}
    first_index: dict[int, int] = {}
    bad: Counter[str] = Counter()
    ambiguous: set[int] = set()
    for i, im in enumerate(coco["images"]):
        iid = im.get("id") if isinstance(im, dict) else None
        where = f"{ann_path}: images[{i}]" + (f" (id {iid})" if iid is not None else "")
        problem = "not an object" if not isinstance(im, dict) else _image_problem(im)
        if problem is not None:
            bad["malformed"] += 1
            issue("image_malformed", f"{where}: {problem}")
            continue
        if iid not in first_index:
            first_index[iid] = i
            images[iid] = im
            continue
        bad["duplicate_id"] += 1
        first = coco["images"][first_index[iid]]
        same = all(im[k] == first[k] for k in ("file_name", "width", "height"))
        if same:
            issue(
                "image_duplicate",
                f"{where}: duplicate image id {iid} (same file as images[{first_index[iid]}]); ignored",
            )
            continue
        if iid not in ambiguous:
            ambiguous.add(iid)
            bad["duplicate_id"] += 1  # the first entry is dropped too
            images.pop(iid, None)
        issue(
            "image_duplicate",
            f"{where}: image id {iid} also names {first['file_name']!r} (images[{first_index[iid]}]); "
            "both entries and the id's annotations are dropped (which file they belong to is unknown)",
        )
    order = [iid for iid in first_index if iid in images]
    return _Images(images, order, bad, ambiguous)


def _check_files(
    images: _Images,
    img_dir: Path,
    pcfg: PrepareConfig,
    split: str,
    issue: _Issues,
    workers: int | None,
    progress: bool,
) -> set[int]:
    """Decode-check every image (threads: decoding and file reads release the GIL); the bad ids."""
    bad_ids: set[int] = set()
    nw = workers if workers is not None else min(16, (os.cpu_count() or 1) + 2)
    order = images.order
    paths = [img_dir / images.by_id[iid]["file_name"] for iid in order]

    def task(k: int) -> tuple[str, str] | None:
        im = images.by_id[order[k]]
        return check_image(paths[k], im["width"], im["height"], pcfg.check_images)

    desc = f"check {split}" if pcfg.check_images else f"stat {split}"
    with ThreadPoolExecutor(max_workers=max(1, nw)) as pool:
        results = pool.map(task, range(len(order)), chunksize=16)
        for k, res in enumerate(tqdm(results, total=len(order), desc=desc, unit="img", disable=not progress)):
            if res is not None:
                reason, msg = res
                images.bad[reason] += 1
                bad_ids.add(order[k])
                issue(f"image_{reason}", msg)
    return bad_ids


@dataclass
class _Boxes:
    """The annotations kept per image id, and what happened to the others."""

    boxes: dict[int, list[list[float]]]  # xyxy original pixels, clamped: what training reads
    labels: dict[int, list[int]]
    areas: dict[int, list[float]]  # COCO's area of each box (COCO: the segment's), for APs/m/l
    ignored: dict[int, list[list[float]]]  # crowd / ignore regions: [x0, y0, x1, y1, label, area, iscrowd]
    dropped: Counter[str] = field(default_factory=Counter)
    clamped: int = 0
    duplicate_ids: int = 0  # annotations whose id an earlier annotation has


def _annotation_problem(a: Any, images: _Images, label_of: dict[int, int]) -> tuple[str, str] | None:
    """(reason, message) when an annotation cannot be used whatever its box, else None."""
    if not isinstance(a, dict):
        return "malformed", "not an object"
    missing = next((k for k in ("image_id", "category_id", "bbox") if k not in a), None)
    if missing:
        return "malformed", f"missing field '{missing}'"
    bbox = a["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_num(v) for v in bbox):
        return "malformed", f"field 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}"
    iid = a["image_id"]
    if not isinstance(iid, bool) and iid in images.ambiguous:
        return "ambiguous_image", f"field 'image_id' {iid} names two different image files; dropped"
    if isinstance(iid, bool) or not isinstance(iid, int) or iid not in images.by_id:
        return "unknown_image", f"field 'image_id' {iid!r} is not in images"
    cid = a["category_id"]
    if isinstance(cid, bool) or not isinstance(cid, int) or cid not in label_of:
        return "unknown_category", f"field 'category_id' {cid!r} is not a known category (image {iid})"
    return None


def _read_annotations(
    coco: dict[str, Any],
    ann_path: Path,
    images: _Images,
    bad_ids: set[int],
    categories: list[dict[str, Any]],
    min_size: float,
    issue: _Issues,
) -> _Boxes:
    """Validate, clamp and sort the annotations: boxes to train on, regions evaluation ignores."""
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    kept = [iid for iid in images.order if iid not in bad_ids]
    out = _Boxes({i: [] for i in kept}, {i: [] for i in kept}, {i: [] for i in kept}, {i: [] for i in kept})
    seen: dict[Any, tuple[int, tuple]] = {}  # annotation id -> (index, what it says)
    for i, a in enumerate(coco["annotations"]):
        aid = a.get("id", f"#{i}") if isinstance(a, dict) else f"#{i}"
        where = f"{ann_path}: annotation {aid}"
        problem = _annotation_problem(a, images, label_of)
        if problem is not None:
            reason, msg = problem
            out.dropped[reason] += 1
            issue(f"box_{reason}", f"{where}: {msg}")
            continue
        if "id" in a and isinstance(a["id"], int | str) and not isinstance(a["id"], bool):
            what = (a["image_id"], a["category_id"], tuple(a["bbox"]), bool(a.get("iscrowd", 0)))
            if a["id"] in seen:
                out.duplicate_ids += 1
                j, before = seen[a["id"]]
                if before == what:
                    out.dropped["duplicate"] += 1
                    issue("box_duplicate", f"{where}: repeats annotation #{j} (same id, same box); dropped")
                    continue
                issue(
                    "box_duplicate",
                    f"{where}: id also used by annotation #{j} with another box; both kept (give every "
                    "annotation its own id: COCO tools look annotations up by id)",
                )
            else:
                seen[a["id"]] = (i, what)
        iid = a["image_id"]
        if iid in bad_ids:
            out.dropped["bad_image"] += 1
            continue
        crowd = bool(a.get("iscrowd", 0))
        ignore = crowd or bool(a.get("ignore", 0))
        im = images.by_id[iid]
        W, H = im["width"], im["height"]
        bbox = a["bbox"]
        x, y, w, h = (float(v) for v in bbox)
        x0, y0, x1, y1 = x, y, x + w, y + h
        if w > 0 and h > 0 and (x1 <= 0 or y1 <= 0 or x0 >= W or y0 >= H):
            out.dropped["outside_image"] += 1
            issue("box_outside", f"{where}: box {bbox} lies outside the {W}x{H} image {iid}")
            continue
        cx0, cy0 = min(max(x0, 0.0), W), min(max(y0, 0.0), H)
        cx1, cy1 = min(max(x1, 0.0), W), min(max(y1, 0.0), H)
        # the official rule keeps every box with a positive width and height (data/transforms.py:268)
        no_area = cx1 <= cx0 or cy1 <= cy0
        if no_area or min(cx1 - cx0, cy1 - cy0) < min_size:
            out.dropped["degenerate"] += 1
            why = "has no area" if no_area else f"is smaller than data.prepare.min_box_size={min_size:g}"
            issue("box_degenerate", f"{where}: box {bbox} {why} after clamping to the {W}x{H} image {iid}")
            continue
        box = [round(cx0, 3), round(cy0, 3), round(cx1, 3), round(cy1, 3)]
        area = float(a["area"]) if _num(a.get("area")) and a["area"] > 0 else (cx1 - cx0) * (cy1 - cy0)
        if ignore:  # not a training target; evaluation does not count detections on it
            out.dropped["crowd" if crowd else "ignore"] += 1
            out.ignored[iid].append([*box, label_of[a["category_id"]], round(area, 3), int(crowd)])
            continue
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            out.clamped += 1
        out.boxes[iid].append(box)
        out.labels[iid].append(label_of[a["category_id"]])
        out.areas[iid].append(round(area, 3))
    return out


def _instance_counts(boxes: list[list[Any]], max_instances: int | None) -> dict[str, int]:
    """How many images hold more objects than a sequence has room for (``tokenizer.max_instances``)."""
    counts = [len(b) for b in boxes]
    out = {"max_boxes_per_image": max(counts, default=0)}
    if max_instances is not None:
        over = [n - max_instances for n in counts if n > max_instances]
        out.update(images_over_max_instances=len(over), boxes_over_max_instances=sum(over))
    return out


def prepare_split(
    root: Path,
    split: str,
    categories: list[dict[str, Any]],
    pcfg: PrepareConfig,
    coco: dict[str, Any] | None = None,
    workers: int | None = None,
    progress: bool = True,
    max_instances: int | None = None,
) -> SplitResult:
    """Validate one split; returns its manifest, report and messages (nothing is written).

    ``max_instances`` (``tokenizer.max_instances``): report the images with more objects than a
    sequence holds.
    """
    root = Path(root)
    ann_path = annotation_path(root, split)
    if coco is None:
        coco = load_coco_json(ann_path)
    img_dir = root / split
    if not img_dir.is_dir():
        raise PrepareError(
            f"{img_dir}: images directory missing for split {split!r} (data.download.subset 'val' "
            "fetches val2017 only, for evaluation: then only the validation split is prepared)"
        )
    issue = _Issues(ann_path)
    images = _read_images(coco, ann_path, issue)
    bad_ids = _check_files(images, img_dir, pcfg, split, issue, workers, progress)
    found = _read_annotations(coco, ann_path, images, bad_ids, categories, pcfg.min_box_size, issue)

    kept_ids = [iid for iid in images.order if iid not in bad_ids]
    im = images.by_id
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "split": split,
        "root": str(root),
        "categories": categories,
        "images": [
            [iid, f"{split}/{im[iid]['file_name']}", im[iid]["width"], im[iid]["height"]] for iid in kept_ids
        ],
        "boxes": [found.boxes[iid] for iid in kept_ids],
        "labels": [found.labels[iid] for iid in kept_ids],
        "areas": [found.areas[iid] for iid in kept_ids],
        "ignored": [found.ignored[iid] for iid in kept_ids],
    }
    n_entries = len(coco["images"])
    n_bad = sum(images.bad.values())
    report = {
        "images_total": n_entries,
        "images_kept": len(kept_ids),
        "images_bad": n_bad,
        "images_bad_fraction": round(n_bad / n_entries, 6) if n_entries else 0.0,
        "images_bad_by_reason": {r: images.bad.get(r, 0) for r in IMAGE_REASONS},
        "images_without_boxes": sum(1 for b in manifest["boxes"] if not b),
        "boxes_total": len(coco["annotations"]),
        "boxes_kept": sum(len(b) for b in manifest["boxes"]),
        "boxes_clamped": found.clamped,
        "boxes_dropped": sum(found.dropped.values()),
        "boxes_dropped_by_reason": {r: found.dropped.get(r, 0) for r in BOX_REASONS},
        "annotation_ids_duplicated": found.duplicate_ids,
        "regions_ignored_in_eval": sum(len(r) for r in manifest["ignored"]),
        **_instance_counts(manifest["boxes"], max_instances),
    }
    return SplitResult(manifest, report, issue.messages)


# ------------------------------------------------------------------------------------ the stage


def manifest_path(prepared_dir: str | os.PathLike[str], split: str) -> Path:
    return Path(prepared_dir) / f"{split}.json"


def split_failures(split: str, rep: dict[str, Any], pcfg: PrepareConfig) -> list[str]:
    """Why a prepared split cannot be used: too many bad images, no images or no boxes left."""
    out = []
    if rep["images_bad_fraction"] > pcfg.max_bad_fraction:
        reasons = ", ".join(f"{k}: {v}" for k, v in rep["images_bad_by_reason"].items() if v)
        out.append(
            f"{split}: {rep['images_bad']} of {rep['images_total']} images are bad "
            f"({rep['images_bad_fraction']:.2%} > data.prepare.max_bad_fraction "
            f"{pcfg.max_bad_fraction:.2%}; {reasons})"
        )
    if rep["images_kept"] == 0:
        out.append(f"{split}: no usable images ({rep['images_total']} entries, {rep['images_bad']} bad)")
    elif rep["boxes_kept"] == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in rep["boxes_dropped_by_reason"].items() if v)
        out.append(
            f"{split}: no boxes to train or evaluate on ({rep['boxes_total']} annotations"
            + (f"; dropped: {reasons})" if reasons else ")")
        )
    return out


def _log_instances(split: str, rep: dict[str, Any], max_instances: int | None) -> None:
    if max_instances is not None and rep.get("images_over_max_instances"):
        log.warning(
            "%s: %d images hold more than tokenizer.max_instances=%d objects (up to %d; %d objects beyond "
            "the limit): each training sequence leaves those out, and evaluation can find at most %d per image",
            split,
            rep["images_over_max_instances"],
            max_instances,
            rep["max_boxes_per_image"],
            rep["boxes_over_max_instances"],
            max_instances,
        )


def prepare_dataset(
    root: str | os.PathLike[str],
    splits: list[str],
    out_dir: str | os.PathLike[str],
    report_path: str | os.PathLike[str] | None,
    pcfg: PrepareConfig,
    workers: int | None = None,
    progress: bool = True,
    max_instances: int | None = None,
) -> dict[str, Any]:
    """Prepare every split (each once) and write manifests, issues.json and the report.

    Raises :class:`PrepareError` when a split has more bad images than ``pcfg.max_bad_fraction``,
    no usable image or no box (after writing the report and issues). A failed run, whatever failed,
    leaves no manifest behind (not even the previous run's), so training never reads stale data.
    ``max_instances`` (``tokenizer.max_instances``): count and report the images with more objects.
    """
    root, out_dir = Path(root), Path(out_dir)
    splits = list(dict.fromkeys(splits))
    try:
        return _prepare(root, splits, out_dir, report_path, pcfg, workers, progress, max_instances)
    except BaseException:
        for s in splits:
            manifest_path(out_dir, s).unlink(missing_ok=True)
        raise


def _prepare(
    root: Path,
    splits: list[str],
    out_dir: Path,
    report_path: str | os.PathLike[str] | None,
    pcfg: PrepareConfig,
    workers: int | None,
    progress: bool,
    max_instances: int | None,
) -> dict[str, Any]:
    files = [(annotation_path(root, s), load_coco_json(annotation_path(root, s))) for s in splits]
    categories = collect_categories(files)
    results = {
        s: prepare_split(
            root,
            s,
            categories,
            pcfg,
            coco=coco,
            workers=workers,
            progress=progress,
            max_instances=max_instances,
        )
        for s, (_, coco) in zip(splits, files, strict=True)
    }
    report: dict[str, Any] = {"num_categories": len(categories)}
    report.update({s: r.report for s, r in results.items()})
    failed = [msg for s, r in results.items() for msg in split_failures(s, r.report, pcfg)]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out_dir / "issues.json", json.dumps({s: r.issues for s, r in results.items()}, indent=1)
    )
    if report_path is not None:
        atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")
    if failed:
        raise PrepareError(
            "cannot use the dataset in "
            + str(root)
            + ": "
            + "; ".join(failed)
            + f" (details in {out_dir / 'issues.json'}; no manifest written)"
        )
    for s, r in results.items():
        mp = manifest_path(out_dir, s)
        atomic_write_text(mp, json.dumps(r.manifest, separators=(",", ":")))
        _log_instances(s, r.report, max_instances)
        log.info(
            "%s: %d images (%d bad), %d boxes kept, %d dropped -> %s",
            s,
            r.report["images_kept"],
            r.report["images_bad"],
            r.report["boxes_kept"],
            r.report["boxes_dropped"],
            mp,
        )
    return report


def run_prepare(
    cfg: Config, report_path: str | os.PathLike[str] = "reports/prepare.json", progress: bool = True
) -> dict:
    """The stage: ``data.root`` -> ``data.prepared_dir`` manifests for the train and val splits, or
    the val split alone when COCO was downloaded with ``data.download.subset: val`` (evaluation only,
    e.g. configs/official-r50-640.yaml: there is no training split to prepare)."""
    d = cfg.data
    val_only = d.source == "coco" and d.download.subset == "val"
    return prepare_dataset(
        d.root,
        [d.val_split] if val_only else [d.train_split, d.val_split],
        d.prepared_dir,
        report_path,
        d.prepare,
        progress=progress,
        max_instances=cfg.tokenizer.max_instances,
    )
