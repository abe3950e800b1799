"""The ``download`` stage: COCO 2017 from the official host (or a mirror), or the generated dataset.

COCO layout on the server (``data.download.base_url``, the official host by default)::

    <base>/zips/train2017.zip
    <base>/zips/val2017.zip
    <base>/annotations/annotations_trainval2017.zip

and on disk after the stage::

    <root>/train2017/*.jpg  <root>/val2017/*.jpg  <root>/annotations/instances_<split>.json
    <root>/.download/<archive>.extracted.json        extraction markers (what is there, from what)
    <archive_dir>/<archive>                          the verified archives (default <root>-archives)
    <archive_dir>/<archive>.verified.json            size + md5 + mtime: no re-download, no re-hash

Guarantees:

- Downloads run in parallel (one thread per archive, ``data.download.workers`` at most), with a
  tqdm bar each, and resume a partial ``<archive>.part`` with an HTTP ``Range`` request (a server
  that ignores ranges is detected and the file restarts from zero): :func:`pix2seq.fetch.download_file`.
- Every archive is checked against its published size and MD5 (:data:`ARCHIVES`, or a custom
  manifest for a mirror/test server); a mismatch removes the file and fails with both values.
- Extraction refuses absolute paths, ``..`` components, symlinks and special files, and entries
  another archive already extracted; it extracts into a temporary directory under ``<root>`` and
  moves the complete files into place, merging into existing directories (another archive's files
  are never removed). A marker listing the files is written last, so an interrupted run never
  leaves something that looks finished.
- Re-runs do nothing once archives are verified and extracted; ``max_train_images`` changes only
  redo the train extraction and the annotation filtering.
- 404 / other HTTP errors, timeouts, a full disk and checksum mismatches raise :class:`DownloadError`
  with the URL or file named. Timeouts and dropped connections are retried (``retries``), resuming.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from pix2seq.atomic import atomic_write_text
from pix2seq.config import Config, DownloadConfig
from pix2seq.fetch import (
    CHUNK,
    ArchiveSpec,
    DownloadError,
    download_file,
    ensure_space,
    is_enospc,
    read_marker,
    verified_record,
)

log = logging.getLogger(__name__)

TRAIN_ZIP = "train2017.zip"
VAL_ZIP = "val2017.zip"
ANNOTATIONS_ZIP = "annotations_trainval2017.zip"
MARKER_DIR = ".download"


# Published values (cocodataset.org; the same numbers every mirror reproduces).
ARCHIVES: dict[str, ArchiveSpec] = {
    TRAIN_ZIP: ArchiveSpec(TRAIN_ZIP, "zips/train2017.zip", 19336861798, "cced6f7f71b7629ddf16f17bbcfab6b2"),
    VAL_ZIP: ArchiveSpec(VAL_ZIP, "zips/val2017.zip", 815585330, "442b8da7639aecaf257c1dceb8ba8c80"),
    ANNOTATIONS_ZIP: ArchiveSpec(
        ANNOTATIONS_ZIP,
        "annotations/annotations_trainval2017.zip",
        252907541,
        "f4bbac642086de4f52a3fdda2de5fa2c",
    ),
}

#: Environment variable naming a JSON manifest that overrides :data:`ARCHIVES` (mirrors, test servers).
MANIFEST_ENV = "PIX2SEQ_DOWNLOAD_MANIFEST"


def archives_for(subset: str) -> list[str]:
    """The archive names a ``data.download.subset`` needs (annotations first: they are small)."""
    if subset == "val":
        return [ANNOTATIONS_ZIP, VAL_ZIP]
    if subset == "all":
        return [ANNOTATIONS_ZIP, VAL_ZIP, TRAIN_ZIP]
    raise DownloadError(f"data.download.subset: must be 'all' or 'val', got {subset!r}")


def parse_manifest(
    data: Mapping[str, Any], base: Mapping[str, ArchiveSpec] | None = None
) -> dict[str, ArchiveSpec]:
    """A custom manifest ``{name: {"size": int|null, "md5": str|null, "path": "zips/x.zip"}}``.

    Entries replace (or add to) ``base`` (default :data:`ARCHIVES`); a missing ``path`` keeps the
    official one. Values may also be :class:`ArchiveSpec` objects.
    """
    out = dict(ARCHIVES if base is None else base)
    for name, entry in data.items():
        if isinstance(entry, ArchiveSpec):
            out[name] = entry
            continue
        if not isinstance(entry, Mapping):
            raise DownloadError(f"download manifest: entry {name!r} must be a mapping, got {entry!r}")
        unknown = set(entry) - {"size", "md5", "path"}
        if unknown:
            raise DownloadError(f"download manifest: entry {name!r} has unknown fields {sorted(unknown)}")
        old = out.get(name)
        path = entry.get("path", old.url_path if old else None)
        if not path:
            raise DownloadError(f"download manifest: entry {name!r} needs a 'path' below the base URL")
        size = entry.get("size")
        md5 = entry.get("md5")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise DownloadError(f"download manifest: {name}.size must be a byte count, got {size!r}")
        if md5 is not None and (not isinstance(md5, str) or len(md5) != 32):
            raise DownloadError(f"download manifest: {name}.md5 must be 32 hex digits, got {md5!r}")
        out[name] = ArchiveSpec(name, str(path), size, md5.lower() if md5 else None)
    return out


def load_manifest_file(path: str | os.PathLike[str]) -> dict[str, ArchiveSpec]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise DownloadError(f"{p}: download manifest not found") from None
    except json.JSONDecodeError as e:
        raise DownloadError(f"{p}: download manifest is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DownloadError(f"{p}: download manifest must be a JSON object of archives")
    return parse_manifest(data)


def archive_url(base_url: str, spec: ArchiveSpec) -> str:
    return base_url.rstrip("/") + "/" + spec.url_path.lstrip("/")


def default_archive_dir(root: Path) -> Path:
    """Archives live beside the dataset (not inside it), so the DVC output holds only the data."""
    root = Path(root)
    return root.parent / f"{root.name}-archives"


# ---------------------------------------------------------------------------------- extraction


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a zip entry must not be extracted, or None when it is safe."""
    name = info.filename
    if not name or "\x00" in name:
        return "an empty or NUL-containing name"
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":") or PurePosixPath(norm).is_absolute():
        return "an absolute path"
    if ".." in norm.split("/"):
        return "a '..' path component"
    mode = info.external_attr >> 16  # Unix mode; 0 or permission bits only for many zip writers
    if stat.S_IFMT(mode):
        if stat.S_ISLNK(mode):
            return "a symbolic link"
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return "a special file (device, fifo or socket)"
    return None


def check_archive(zip_path: Path) -> list[zipfile.ZipInfo]:
    """All entries of ``zip_path``; raises :class:`DownloadError` naming the first unsafe one."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{zip_path}: not a valid zip archive ({e})") from None
    for info in infos:
        why = _member_problem(info)
        if why:
            raise DownloadError(f"{zip_path}: refusing to extract: entry {info.filename!r} is {why}")
    return infos


def _entry_name(info: zipfile.ZipInfo) -> str:
    return info.filename.replace("\\", "/").rstrip("/")


def safe_extract(
    zip_path: Path,
    dest: Path,
    select: Callable[[list[zipfile.ZipInfo]], list[zipfile.ZipInfo]] | None = None,
    progress: bool = True,
    *,
    previous: Iterable[str] = (),
    others: Mapping[str, str] | None = None,
) -> list[str]:
    """Extract ``zip_path`` (the entries ``select`` keeps) into ``dest``, all or nothing, merging
    into directories that already exist; returns the extracted files (``/``-separated, relative).

    Every entry is checked first (see :func:`check_archive`). An entry naming a file another
    archive extracted (``others``: file -> archive) is refused: two archives never overwrite each
    other's files. Files go to a temporary directory under ``dest`` and are moved into place one
    by one once all are complete; files of this archive's earlier extraction (``previous``) that it
    no longer holds are removed, and nothing else in ``dest`` is touched. Nothing of a failed
    extraction is left behind.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    infos = check_archive(zip_path)
    if select is not None:
        infos = select(infos)
    files = [_entry_name(i) for i in infos if not i.is_dir()]
    for name in files:
        owner = (others or {}).get(name)
        if owner is not None:
            raise DownloadError(
                f"{zip_path}: refusing to extract: entry {name!r} is also in {owner}, already extracted "
                f"into {dest} (the archives overlap; remove one of them from the download)"
            )
    dest.mkdir(parents=True, exist_ok=True)
    ensure_space(dest, sum(i.file_size for i in infos), f"extracting {zip_path.name}")
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=f".extract-{zip_path.stem}-"))
    try:
        _extract_to(zip_path, infos, tmp, progress)
        for name in [_entry_name(i) for i in infos if i.is_dir()]:
            (dest / name).mkdir(parents=True, exist_ok=True)
        for name in files:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, dest / name)
        for name in sorted(set(previous) - set(files)):  # e.g. fewer train images than last time
            if (others or {}).get(name) is None:
                (dest / name).unlink(missing_ok=True)
        return files
    except OSError as e:
        if is_enospc(e):
            raise DownloadError(
                f"disk full (ENOSPC) while extracting {zip_path.name} into {dest}; nothing was kept"
            ) from None
        raise
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{zip_path}: corrupt zip archive ({e})") from None
    finally:
        _remove(tmp)


def _extract_to(zip_path: Path, infos: list[zipfile.ZipInfo], tmp: Path, progress: bool) -> None:
    """Write ``infos`` below ``tmp`` (re-checking that no entry leaves it)."""
    tmp_resolved = tmp.resolve()
    with zipfile.ZipFile(zip_path) as zf:
        for info in tqdm(
            infos, desc=f"extract {zip_path.name}", unit="file", disable=not progress, leave=False
        ):
            target = (tmp / _entry_name(info)).resolve()
            if tmp_resolved not in target.parents and target != tmp_resolved:
                raise DownloadError(
                    f"{zip_path}: refusing to extract: entry {info.filename!r} leaves the target"
                )
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)


def _remove(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    elif p.exists():
        shutil.rmtree(p, ignore_errors=True)


def _cleanup_stale(root: Path) -> None:
    """Remove temporary directories an interrupted run left under ``root``."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith((".extract-", ".old-")):
            _remove(p)


def _first_images(prefix: str, n: int) -> Callable[[list[zipfile.ZipInfo]], list[zipfile.ZipInfo]]:
    """Keep the first ``n`` image files under ``prefix/`` (by name); ``n == 0`` keeps everything."""

    def select(infos: list[zipfile.ZipInfo]) -> list[zipfile.ZipInfo]:
        if n <= 0:
            return infos
        files = sorted(
            (i for i in infos if not i.is_dir() and i.filename.startswith(prefix + "/")),
            key=lambda i: i.filename,
        )
        return files[:n]

    return select


# --------------------------------------------------------------------------- the whole dataset


def _extract_marker(root: Path, archive: str) -> Path:
    return root / MARKER_DIR / f"{archive}.extracted.json"


def _extracted_files(marker: dict | None, root: Path) -> list[str]:
    """The files an extraction marker says its archive wrote (markers of earlier versions list only
    top-level directories, which that version replaced whole: everything below them)."""
    if not marker:
        return []
    if "files" in marker:
        return list(marker["files"])
    return [
        p.relative_to(root).as_posix()
        for t in marker.get("tops", [])
        for p in sorted((root / t).rglob("*"))
        if p.is_file()
    ]


def _files_of_other_archives(root: Path, archive: str) -> dict[str, str]:
    """file -> archive name, for every other archive extracted into ``root``."""
    out: dict[str, str] = {}
    for marker in sorted((root / MARKER_DIR).glob("*.extracted.json")):
        name = marker.name.removesuffix(".extracted.json")
        if name != archive:
            out.update((f, name) for f in _extracted_files(read_marker(marker), root))
    return out


def _extract_once(zip_path: Path, root: Path, key: dict, select=None, progress: bool = True) -> bool:
    """Extract unless the marker says the same archive (``key``) is already extracted. True if it ran."""
    marker = _extract_marker(root, zip_path.name)
    m = read_marker(marker)
    if m and m.get("key") == key and all((root / t).exists() for t in m.get("tops", [])):
        log.info("%s: already extracted", zip_path.name)
        return False
    previous = _extracted_files(m, root)
    others = _files_of_other_archives(root, zip_path.name)
    # from here on the old extraction no longer counts as complete, but its files stay listed, so an
    # interrupted run's successor still knows which files are this archive's
    if previous:
        atomic_write_text(marker, json.dumps({"key": None, "tops": [], "files": previous}))
    else:
        marker.unlink(missing_ok=True)
    files = safe_extract(zip_path, root, select, progress, previous=previous, others=others)
    tops = sorted({f.split("/", 1)[0] for f in files})
    atomic_write_text(marker, json.dumps({"key": key, "tops": tops, "files": files}))
    return True


def filter_train_annotations(
    annotations_zip: Path, root: Path, split: str, keep_files: set[str] | None, key: dict
) -> None:
    """Write ``<root>/annotations/instances_<split>.json`` keeping only images in ``keep_files``.

    Read from the annotations archive each time (so N can change either way); ``keep_files=None``
    restores the full file. Skipped when a marker says the same filter already produced the file.
    """
    out = root / "annotations" / f"instances_{split}.json"
    marker = root / MARKER_DIR / f"instances_{split}.filter.json"
    m = read_marker(marker)
    if m and m.get("key") == key and out.exists() and m.get("mtime_ns") == out.stat().st_mtime_ns:
        return
    marker.unlink(missing_ok=True)
    member = f"annotations/instances_{split}.json"
    try:
        with zipfile.ZipFile(annotations_zip) as zf, zf.open(member) as f:
            coco = json.load(f)
    except KeyError:
        raise DownloadError(f"{annotations_zip}: has no {member}") from None
    if keep_files is not None:
        images = [im for im in coco.get("images", []) if im.get("file_name") in keep_files]
        ids = {im["id"] for im in images}
        coco["images"] = images
        coco["annotations"] = [a for a in coco.get("annotations", []) if a.get("image_id") in ids]
        log.info("%s: kept %d images and %d annotations", out, len(images), len(coco["annotations"]))
    atomic_write_text(out, json.dumps(coco))
    atomic_write_text(marker, json.dumps({"key": key, "mtime_ns": out.stat().st_mtime_ns}))


def download_coco(
    dcfg: DownloadConfig,
    root: str | os.PathLike[str],
    *,
    train_split: str = "train2017",
    val_split: str = "val2017",
    archive_dir: str | os.PathLike[str] | None = None,
    manifest: Mapping[str, ArchiveSpec | Mapping[str, Any]] | None = None,
    backoff_s: float = 1.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Download, verify and extract COCO 2017 (``dcfg.subset``) into ``root``; idempotent.

    Returns a summary ``{"archives": {name: path}, "extracted": [names extracted this run]}``.
    """
    root = Path(root)
    archive_dir = Path(archive_dir) if archive_dir is not None else default_archive_dir(root)
    specs = parse_manifest(manifest) if manifest is not None else dict(ARCHIVES)
    names = archives_for(dcfg.subset)
    splits = {VAL_ZIP: "val2017", TRAIN_ZIP: "train2017"}
    wanted = {val_split} | ({train_split} if dcfg.subset == "all" else set())
    unknown = wanted - {"train2017", "val2017"}
    if unknown:
        raise DownloadError(
            f"data.train_split/val_split: COCO 2017 archives provide train2017 and val2017, not {sorted(unknown)}"
        )
    missing = [n for n in names if n not in specs]
    if missing:
        raise DownloadError(f"download manifest has no entry for {missing}")
    root.mkdir(parents=True, exist_ok=True)
    archive_dir.mkdir(parents=True, exist_ok=True)
    _cleanup_stale(root)

    # 1. download in parallel
    paths: dict[str, Path] = {}
    errors: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, min(dcfg.workers, len(names)))) as pool:
        futures = {
            name: pool.submit(
                download_file,
                archive_url(dcfg.base_url, specs[name]),
                archive_dir / name,
                specs[name],
                timeout_s=dcfg.timeout_s,
                retries=dcfg.retries,
                verify_checksums=dcfg.verify_checksums,
                backoff_s=backoff_s,
                progress=progress,
                position=i,
            )
            for i, name in enumerate(names)
        }
        for name, fut in futures.items():
            try:
                paths[name] = fut.result()
            except DownloadError as e:
                errors.append(str(e))
    if errors:
        raise DownloadError("; ".join(errors) if len(errors) > 1 else errors[0])

    # 2. extract (annotations first, then images)
    extracted: list[str] = []
    n_train = dcfg.max_train_images
    for name in names:
        m = verified_record(paths[name]) or {}
        key: dict[str, Any] = {"archive": name, "size": m.get("size"), "md5": m.get("md5")}
        select = None
        if name == TRAIN_ZIP:
            key["max_images"] = n_train
            select = _first_images(splits[name], n_train)
        if _extract_once(paths[name], root, key, select, progress):
            extracted.append(name)

    # 3. the train annotations follow the kept images
    if dcfg.subset == "all":
        ann_key = {
            "max_train_images": n_train,
            "annotations": (verified_record(paths[ANNOTATIONS_ZIP]) or {}).get("md5"),
        }
        if n_train > 0:  # the images this archive extracted (not whatever else is in the folder)
            extracted = _extracted_files(read_marker(_extract_marker(root, TRAIN_ZIP)), root)
            keep = {f.split("/", 1)[1] for f in extracted if f.startswith("train2017/")}
            filter_train_annotations(paths[ANNOTATIONS_ZIP], root, "train2017", keep, ann_key)
        elif (root / MARKER_DIR / "instances_train2017.filter.json").exists():
            # an earlier run filtered the file: restore the full annotations
            filter_train_annotations(paths[ANNOTATIONS_ZIP], root, "train2017", None, ann_key)
    return {"archives": {k: str(v) for k, v in paths.items()}, "extracted": extracted}


def run_download(
    cfg: Config, manifest: Mapping[str, Any] | None = None, progress: bool = True
) -> dict[str, Any]:
    """The stage: ``data.source == generated`` writes the generated dataset, ``coco`` downloads COCO,
    ``local`` links your own files into ``data.root`` (:mod:`pix2seq.data.local`).

    ``manifest`` (or a JSON file named by ``$PIX2SEQ_DOWNLOAD_MANIFEST``) overrides the published
    sizes/checksums, for a mirror or test server with other archives.
    """
    d = cfg.data
    root = Path(d.root)
    if d.source == "local":
        from pix2seq.data.local import link_local_dataset

        return link_local_dataset(cfg)
    if d.source == "generated":
        from pix2seq.data.synthetic import write_generated_dataset

        write_generated_dataset(d.generated, root, d.train_split, d.val_split)
        return {"source": "generated", "root": str(root)}
    if manifest is None and os.environ.get(MANIFEST_ENV):
        manifest = load_manifest_file(os.environ[MANIFEST_ENV])
    summary = download_coco(
        d.download,
        root,
        train_split=d.train_split,
        val_split=d.val_split,
        manifest=manifest,
        progress=progress,
    )
    summary.update(source="coco", root=str(root))
    return summary
