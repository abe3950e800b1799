"""Your own COCO-format data, in place (``data.source: local``).

The four paths in ``data.local`` (absolute, or relative to the working directory: the repository
for the DVC stages) name the training and validation annotation files (COCO ``instances`` JSON) and
the folders their images' ``file_name`` entries are relative to. Nothing is copied or downloaded:
the download stage links them into ``data.root`` in the layout every later stage reads::

    <root>/annotations/instances_<train_split>.json -> data.local.train_annotations
    <root>/annotations/instances_<val_split>.json   -> data.local.val_annotations
    <root>/<train_split>                            -> data.local.train_images
    <root>/<val_split>                              -> data.local.val_images

and the prepare stage validates them there (every image opened, every box checked). DVC follows the
annotation links, so editing an annotation file re-runs prepare and everything after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pix2seq.atomic import atomic_symlink
from pix2seq.config import Config
from pix2seq.errors import Pix2SeqError


class LocalDataError(Pix2SeqError):
    """A ``data.local`` path that is missing or of the wrong kind; the message names the key."""


def _existing(key: str, raw: str, kind: str) -> Path:
    path = Path(raw).expanduser().resolve()  # a relative path: from the current folder
    if kind == "file" and not path.is_file():
        raise LocalDataError(f"data.local.{key}: {path}: no such file (a COCO instances JSON)")
    if kind == "dir" and not path.is_dir():
        raise LocalDataError(f"data.local.{key}: {path}: no such folder (the images' folder)")
    return path


def _link(target: Path, link: Path) -> None:
    """``link`` -> ``target``, swapped in atomically; never replaces a real file or folder."""
    if link.exists() and not link.is_symlink():
        raise LocalDataError(
            f"data.root: {link} is a real {'folder' if link.is_dir() else 'file'}, not a link; "
            "with data.source: local, data.root must be a folder of its own (e.g. data/mydata)"
        )
    atomic_symlink(target, link)


def link_local_dataset(cfg: Config) -> dict[str, Any]:
    """Check the ``data.local`` paths and link them into ``data.root``; returns what was linked."""
    d = cfg.data
    root = Path(d.root)
    linked: dict[str, str] = {}
    for split, prefix in ((d.train_split, "train"), (d.val_split, "val")):
        annotations = _existing(f"{prefix}_annotations", getattr(d.local, f"{prefix}_annotations"), "file")
        images = _existing(f"{prefix}_images", getattr(d.local, f"{prefix}_images"), "dir")
        _link(annotations, root / "annotations" / f"instances_{split}.json")
        _link(images, root / split)
        linked[split] = f"{annotations} + {images}"
    return {"source": "local", "root": str(root), "linked": linked}
