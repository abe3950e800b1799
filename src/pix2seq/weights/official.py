"""The released Pix2Seq checkpoints: ``official:NAME`` -> a local, converted model file.

    pix2seq weights download resnet_640        # or name official:resnet_640 wherever a model is named

Source: the public Cloud Storage bucket ``pix2seq`` over plain HTTPS (no Google client, no account).
The JSON API lists a checkpoint folder with each object's size and MD5
(``GET <base>/storage/v1/b/pix2seq/o?prefix=<folder>/``); the checkpoint the folder's ``checkpoint``
pointer names (else the highest step) is downloaded object by object from ``<base>/pix2seq/<object>``
by :func:`pix2seq.fetch.download_file`: resumable (HTTP ``Range``, ``.part`` files) and
checked against the listed MD5 and the one the server declares (``x-goog-hash``). It is then
converted by :func:`pix2seq.weights.convert.convert_checkpoint` into a model file that predict,
evaluate and training read. ``<base>`` is ``https://storage.googleapis.com`` unless
``$PIX2SEQ_OFFICIAL_BASE_URL`` names a mirror with the same layout.

Cache (``$PIX2SEQ_OFFICIAL_CACHE``, default ``$XDG_CACHE_HOME/pix2seq/official``, i.e.
``~/.cache/pix2seq/official``)::

    <cache>/<name>/ckpt-<step>.index, ckpt-<step>.data-*   the TF checkpoint as published
    <cache>/<name>/checkpoint, config.json                 its pointer file and the official config
    <cache>/<name>/*.verified.json                         size + MD5 markers: never fetched twice
    <cache>/<name>/model.pt                                the converted model file
    <cache>/<name>/model.pt.source.json                    what it was converted from (written last)

Once ``model.pt`` and its source marker exist, :func:`resolve` touches no network. Delete
``model.pt`` to convert again (the TF files stay cached); delete the folder to download again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import requests

from pix2seq.atomic import atomic_path, atomic_write_text
from pix2seq.errors import Pix2SeqError
from pix2seq.fetch import ArchiveSpec, DownloadError, download_file, md5_hex_from_base64

PREFIX = "official:"
BUCKET = "pix2seq"
DEFAULT_BASE_URL = "https://storage.googleapis.com"
BASE_URL_ENV = "PIX2SEQ_OFFICIAL_BASE_URL"
CACHE_ENV = "PIX2SEQ_OFFICIAL_CACHE"
POINTER = "checkpoint"  # tf.train.CheckpointManager's text file naming the latest checkpoint
CONFIG = "config.json"  # the official run's config, kept beside the checkpoint for reference
MODEL_FILE = "model.pt"

Arch = Literal["resnet", "resnet-c"]
#: ``(checkpoint prefix, arch, image_size, out) -> out``: :func:`pix2seq.weights.convert.convert_checkpoint`
Converter = Callable[[Path, Arch, int, Path], Path]


class OfficialWeightsError(Pix2SeqError, ValueError):
    """An unknown official model name, or a checkpoint folder that does not hold a checkpoint."""


@dataclass(frozen=True)
class OfficialModel:
    """One released checkpoint: its bucket folder, architecture, input size and published COCO AP."""

    name: str
    folder: str  # object prefix in the bucket
    arch: Arch
    image_size: int
    published_ap: float  # COCO val2017 AP from the official README (not measured here)
    backbone: str


def _catalogue() -> dict[str, OfficialModel]:
    """The R50 (C5) and R50-C4 COCO detection checkpoints (official configs/config_det_finetune.py,
    ``get_coco_finetuned_checkpoint``; APs from the official README)."""
    aps = {("resnet", 640): 39.1, ("resnet", 1024): 41.7, ("resnet", 1333): 42.6}
    aps |= {("resnetc", 640): 44.7, ("resnetc", 1024): 46.9, ("resnetc", 1333): 47.3}
    out = {}
    for (stem, size), ap in aps.items():
        name = f"{stem}_{size}"
        arch: Arch = "resnet" if stem == "resnet" else "resnet-c"
        backbone = "ResNet-50" if stem == "resnet" else "ResNet-50 (C4)"
        out[name] = OfficialModel(name, f"coco_det_finetune/{stem}_{size}x{size}", arch, size, ap, backbone)
    return out


MODELS: dict[str, OfficialModel] = _catalogue()


def is_official(spec: str) -> bool:
    return spec.strip().startswith(PREFIX)


def lookup(name: str) -> OfficialModel:
    """``resnet_640`` or ``official:resnet_640`` -> its catalogue entry; unknown names list the known."""
    key = name.strip().removeprefix(PREFIX)
    if key not in MODELS:
        raise OfficialWeightsError(
            f"unknown official model {name!r}; known: {', '.join(MODELS)} (see `pix2seq weights download --list`)"
        )
    return MODELS[key]


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV, "").strip():
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pix2seq" / "official"


def base_url(url: str | None = None) -> str:
    return (url or os.environ.get(BASE_URL_ENV, "").strip() or DEFAULT_BASE_URL).rstrip("/")


# ------------------------------------------------------------------------------------ listing


@dataclass(frozen=True)
class StoredObject:
    """One object of the bucket as the JSON API lists it (``md5`` in hex; None if not listed)."""

    name: str  # full object name, e.g. coco_det_finetune/resnet_640x640/ckpt-74844.index
    size: int | None
    md5: str | None

    @property
    def basename(self) -> str:
        return PurePosixPath(self.name).name


def list_objects(folder: str, url: str | None = None, timeout_s: float = 60.0) -> list[StoredObject]:
    """The objects directly inside ``folder`` of the bucket, with their sizes and MD5s."""
    endpoint = f"{base_url(url)}/storage/v1/b/{BUCKET}/o"
    params = {"prefix": folder.rstrip("/") + "/", "fields": "items(name,size,md5Hash),nextPageToken"}
    where = f"{endpoint}?prefix={params['prefix']}"
    out: list[StoredObject] = []
    with requests.Session() as session:
        while True:
            try:
                r = session.get(endpoint, params=params, timeout=timeout_s)
            except requests.exceptions.RequestException as e:
                raise DownloadError(
                    f"cannot list {where}: {type(e).__name__} (no network? a mirror can be set with "
                    f"${BASE_URL_ENV})"
                ) from None
            if r.status_code != 200:
                raise DownloadError(f"HTTP {r.status_code} {r.reason} listing {where}")
            try:
                page = r.json()
                items = page.get("items", [])
                for item in items:
                    size = item.get("size")
                    md5 = item.get("md5Hash")
                    out.append(
                        StoredObject(
                            str(item["name"]),
                            int(size) if size is not None else None,
                            md5_hex_from_base64(md5) if md5 else None,
                        )
                    )
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise DownloadError(f"{where}: not a Cloud Storage object listing ({e})") from None
            token = page.get("nextPageToken")
            if not token:
                break
            params["pageToken"] = token
    direct = [o for o in out if "/" not in o.name[len(params["prefix"]) :]]
    if not direct:
        raise DownloadError(f"{where}: no objects in gs://{BUCKET}/{params['prefix']}")
    return direct


def _step(prefix: str) -> int:
    m = re.search(r"(\d+)$", prefix)
    return int(m.group(1)) if m else -1


def pointer_target(text: str) -> str | None:
    """The checkpoint a ``checkpoint`` pointer file names (``model_checkpoint_path: "ckpt-74844"``)."""
    m = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', text, re.MULTILINE)
    return PurePosixPath(m.group(1)).name if m else None


def checkpoint_objects(objects: list[StoredObject], preferred: str | None) -> tuple[str, list[StoredObject]]:
    """(checkpoint prefix, its ``.index`` and every ``.data-*`` shard) among a folder's objects:
    ``preferred`` (the pointer's target) when it is complete, else the complete one of highest step."""
    by_name = {o.basename: o for o in objects}
    complete: dict[str, list[StoredObject]] = {}
    for base in by_name:
        if not base.endswith(".index"):
            continue
        prefix = base.removesuffix(".index")
        shards = [o for b, o in by_name.items() if b.startswith(prefix + ".data-")]
        m = re.search(r"-of-(\d+)$", shards[0].basename) if shards else None
        if m and len(shards) == int(m.group(1)):
            complete[prefix] = [by_name[base], *sorted(shards, key=lambda o: o.basename)]
    if not complete:
        folder = str(PurePosixPath(objects[0].name).parent) if objects else "?"
        raise OfficialWeightsError(f"gs://{BUCKET}/{folder}: no complete checkpoint (.index + .data-*)")
    prefix = preferred if preferred in complete else max(complete, key=_step)
    return prefix, complete[prefix]


# ----------------------------------------------------------------------------------- download


def _fetch(
    obj: StoredObject, dest_dir: Path, url: str, progress: bool, timeout_s: float, retries: int
) -> Path:
    spec = ArchiveSpec(obj.basename, f"{BUCKET}/{obj.name}", obj.size, obj.md5)
    return download_file(
        f"{url}/{BUCKET}/{obj.name}",
        dest_dir / obj.basename,
        spec,
        timeout_s=timeout_s,
        retries=retries,
        progress=progress,
    )


def download(
    name: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    url: str | None = None,
    progress: bool = True,
    timeout_s: float = 60.0,
    retries: int = 3,
) -> Path:
    """Download and verify one official checkpoint into ``<cache>/<name>/``; returns its prefix
    (``<cache>/<name>/ckpt-<step>``). Files verified before are not fetched again."""
    model = lookup(name)
    url = base_url(url)
    folder = cache_root(cache_dir) / model.name
    objects = list_objects(model.folder, url, timeout_s)
    extras = {o.basename: o for o in objects if o.basename in (POINTER, CONFIG)}
    preferred = None
    if POINTER in extras:
        pointer = _fetch(extras[POINTER], folder, url, False, timeout_s, retries)
        preferred = pointer_target(pointer.read_text(errors="replace"))
    prefix, files = checkpoint_objects(objects, preferred)
    if CONFIG in extras:
        files = [extras[CONFIG], *files]
    for obj in files:
        _fetch(obj, folder, url, progress, timeout_s, retries)
    return folder / prefix


# ---------------------------------------------------------------------------------- resolving


def _source_marker(out: Path) -> Path:
    return out.with_name(out.name + ".source.json")


def converted_model(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The cached converted model file of ``name``, or None when it is not (completely) there."""
    out = cache_root(cache_dir) / lookup(name).name / MODEL_FILE
    return out if out.is_file() and _source_marker(out).is_file() else None


def _default_converter() -> Converter:
    # imported when needed: converting reads TensorFlow checkpoints (the `official` extra; without
    # it ConversionError says so in one line, and the verified download stays cached)
    from pix2seq.weights.convert import convert_checkpoint

    return convert_checkpoint


def convert(model: OfficialModel, prefix: Path, out: Path, converter: Converter | None = None) -> Path:
    """Convert the checkpoint at ``prefix`` into ``out`` (all or nothing) and record its source."""
    convert_fn = converter or _default_converter()
    with atomic_path(out) as tmp:
        convert_fn(prefix, model.arch, model.image_size, tmp)
    source = {"name": model.name, "bucket_folder": model.folder, "checkpoint": prefix.name}
    atomic_write_text(_source_marker(out), json.dumps(source, indent=2) + "\n")
    return out


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """One process at a time per model folder (torchrun ranks, tuning workers resolving at once):
    the others wait, then find the converted file."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def resolve(
    spec: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    url: str | None = None,
    progress: bool = True,
    converter: Converter | None = None,
) -> Path:
    """``official:resnet_640`` -> the local converted model file (download, verify, cache, convert)."""
    model = lookup(spec)
    cached = converted_model(model.name, cache_dir)
    if cached is not None:
        return cached
    with _exclusive(cache_root(cache_dir) / model.name):
        cached = converted_model(model.name, cache_dir)  # another process may have just made it
        if cached is not None:
            return cached
        prefix = download(model.name, cache_dir=cache_dir, url=url, progress=progress)
        return convert(model, prefix, prefix.parent / MODEL_FILE, converter)


def local_model_file(spec: str) -> Path:
    """A model named in a config (``official:NAME`` or a path) -> a local file path (not checked)."""
    return resolve(spec) if is_official(spec) else Path(spec).expanduser()
