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
  that ignores ranges is detected and the file restarts from zero).
- Every archive is checked against its published size and MD5 (:data:`ARCHIVES`, or a custom
  manifest for a mirror/test server), or, where none is published, against the MD5 the server
  declares for the object (Google Cloud Storage's ``x-goog-hash: md5=<base64>``); a mismatch removes
  the file and fails with both values. :func:`download_file` is the reusable part (the official
  weights use it too).
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

import base64
import binascii
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

import requests
import urllib3
from tqdm import tqdm

from pix2seq.atomic import atomic_write_text
from pix2seq.config import Config, DownloadConfig
from pix2seq.errors import Pix2SeqError

log = logging.getLogger(__name__)

TRAIN_ZIP = "train2017.zip"
VAL_ZIP = "val2017.zip"
ANNOTATIONS_ZIP = "annotations_trainval2017.zip"
MARKER_DIR = ".download"
_CHUNK = 1 << 20
_SPACE_MARGIN = 64 << 20  # keep this much free beyond what a download/extraction needs


class DownloadError(Pix2SeqError, RuntimeError):
    """A download or extraction failed; the message names the URL or file and what to do."""


@dataclass(frozen=True)
class ArchiveSpec:
    """One archive: its path below the base URL and its published size (bytes) and MD5.

    ``size``/``md5`` may be None in a custom manifest (then that check is skipped).
    """

    name: str
    url_path: str
    size: int | None
    md5: str | None


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


# ------------------------------------------------------------------------------------ helpers


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _ensure_space(directory: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if need > 0 and free < need + _SPACE_MARGIN:
        raise DownloadError(
            f"not enough disk space in {directory} for {what}: need {_human(need)} "
            f"(+{_human(_SPACE_MARGIN)} margin), {_human(free)} free (ENOSPC)"
        )


def _is_enospc(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def md5_file(path: Path, progress: bool = False) -> str:
    h = hashlib.md5()
    size = path.stat().st_size
    with (
        open(path, "rb") as f,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"md5 {path.name}",
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        while chunk := f.read(_CHUNK * 8):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _marker_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verified.json")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, json.JSONDecodeError):
        return None


def is_verified(dest: Path, spec: ArchiveSpec) -> bool:
    """True when ``dest`` carries a marker written after verification and is unchanged since."""
    m = _read_json(_marker_path(dest))
    if not m or not dest.is_file():
        return False
    st = dest.stat()
    return (
        m.get("size") == st.st_size
        and m.get("mtime_ns") == st.st_mtime_ns
        and (spec.size is None or spec.size == st.st_size)
        and (spec.md5 is None or m.get("md5") == spec.md5)
    )


def _write_verified(dest: Path, md5: str | None) -> None:
    st = dest.stat()
    atomic_write_text(
        _marker_path(dest), json.dumps({"size": st.st_size, "md5": md5, "mtime_ns": st.st_mtime_ns})
    )


class _Retryable(Exception):
    """A transient failure (timeout, dropped connection, 5xx): retry, resuming the partial file."""


class _Restart(Exception):
    """The partial file cannot be continued (server ignored the range / it is too long): start over."""


# ----------------------------------------------------------------------------------- download


class _PartFile:
    """``<dest>.part`` with an MD5 kept in step with its bytes, so a resume never re-reads them twice."""

    def __init__(self, path: Path, hash_md5: bool):
        self.path = path
        self.hash_md5 = hash_md5
        self.md5 = hashlib.md5() if hash_md5 else None
        self.offset = 0  # bytes on disk that are also in self.md5
        self.sync()

    def sync(self) -> None:
        """Make the hash state match the file on disk (re-hash when they disagree)."""
        size = self.path.stat().st_size if self.path.exists() else 0
        if size == self.offset:
            return
        if size > self.offset and self.offset > 0 and self.md5 is not None:
            # e.g. a partial write after an error: drop the unhashed tail
            os.truncate(self.path, self.offset)
            return
        self.md5 = hashlib.md5() if self.hash_md5 else None
        self.offset = 0
        if size and self.md5 is not None:
            with open(self.path, "rb") as f:
                while chunk := f.read(_CHUNK * 8):
                    self.md5.update(chunk)
        self.offset = size

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)
        self.md5 = hashlib.md5() if self.hash_md5 else None
        self.offset = 0

    def append(self, chunks: Iterable[bytes], bar: tqdm) -> None:
        with open(self.path, "ab", buffering=0) as f:
            try:
                for chunk in chunks:
                    if not chunk:
                        continue
                    view = memoryview(chunk)
                    while view:
                        n = f.write(view)
                        view = view[n:]
                    if self.md5 is not None:
                        self.md5.update(chunk)
                    self.offset += len(chunk)
                    bar.update(len(chunk))
            finally:
                f.close()
                if self.path.stat().st_size != self.offset:
                    os.truncate(self.path, self.offset)


def md5_hex_from_base64(value: str) -> str | None:
    """A base64 MD5 (Cloud Storage's ``md5Hash`` and ``x-goog-hash``) as 32 hex digits; None if malformed."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 16 else None


def declared_md5(headers: Mapping[str, str]) -> str | None:
    """The whole object's MD5 a response declares: ``x-goog-hash: crc32c=...,md5=<base64>`` (GCS sends
    it on full and ranged reads alike); None when it declares none."""
    for item in headers.get("x-goog-hash", "").split(","):
        kind, _, value = item.strip().partition("=")
        if kind.lower() == "md5" and value:
            return md5_hex_from_base64(value)
    return None


def _open_stream(url: str, start: int, timeout_s: float, session: requests.Session):
    """(status, total_size or None, iterator of chunks, closer, declared MD5 or None) for ``url``
    from byte ``start``."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        local = Path(unquote(parsed.path))
        if not local.is_file():
            raise DownloadError(f"{url}: not found (404); check data.download.base_url")
        total = local.stat().st_size
        f = open(local, "rb")
        f.seek(start)

        def it():
            while chunk := f.read(_CHUNK):
                yield chunk

        return (206 if start else 200), total, it(), f.close, None
    headers = {"Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        r = session.get(url, stream=True, timeout=(timeout_s, timeout_s), headers=headers)
    except requests.exceptions.Timeout as e:
        raise _Retryable(f"timed out after {timeout_s:g}s waiting for {url}") from e
    except requests.exceptions.ConnectionError as e:
        raise _Retryable(f"cannot connect to {url}: {e}") from e
    except requests.exceptions.RequestException as e:
        raise DownloadError(f"{url}: {e}") from None
    code = r.status_code
    if code == 416 and start:  # the range starts at/after the end: we may already have it all
        cr = r.headers.get("Content-Range", "")
        r.close()
        total = int(cr.rsplit("/", 1)[1]) if "/" in cr and cr.rsplit("/", 1)[1].isdigit() else None
        return 416, total, iter(()), lambda: None, declared_md5(r.headers)
    if code == 404:
        r.close()
        raise DownloadError(f"HTTP 404 Not Found: {url} (check data.download.base_url and the archive name)")
    if code in (408, 429) or code >= 500:
        r.close()
        raise _Retryable(f"HTTP {code} {r.reason} from {url}")
    if code >= 400:
        r.close()
        raise DownloadError(f"HTTP {code} {r.reason}: {url}")
    if code not in (200, 206):
        r.close()
        raise DownloadError(f"HTTP {code} {r.reason}: {url} (expected 200 or 206)")
    total: int | None = None
    if code == 206:
        cr = r.headers.get("Content-Range", "")  # bytes a-b/total
        try:
            span, size = cr.split(" ", 1)[1].split("/")
            first = int(span.split("-")[0])
        except (IndexError, ValueError):
            r.close()
            raise _Restart(f"{url}: unusable Content-Range {cr!r}") from None
        if first != start:
            r.close()
            raise _Restart(f"{url}: asked for byte {start}, server sent from {first}")
        total = int(size) if size.isdigit() else None
    elif "Content-Length" in r.headers:
        total = int(r.headers["Content-Length"])

    raw = r.raw

    def it():
        # read1: hand over whatever has arrived, so a dropped connection loses no received bytes
        try:
            while chunk := raw.read1(_CHUNK, decode_content=False):
                yield chunk
        except (urllib3.exceptions.ReadTimeoutError, TimeoutError) as e:
            raise _Retryable(f"timed out after {timeout_s:g}s reading {url}") from e
        except (urllib3.exceptions.HTTPError, ConnectionError) as e:
            raise _Retryable(f"connection to {url} dropped: {e}") from e

    return code, total, it(), r.close, declared_md5(r.headers)


def download_file(
    url: str,
    dest: Path,
    spec: ArchiveSpec,
    *,
    timeout_s: float = 60.0,
    retries: int = 3,
    verify_checksums: bool = True,
    backoff_s: float = 1.0,
    progress: bool = True,
    position: int = 0,
) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify it, and mark it verified.

    The MD5 checked is ``spec.md5`` or, when that is None, the one the server declares for the object
    (:func:`declared_md5`); a server declaring another MD5 than ``spec.md5`` is an error, and one
    whose declared MD5 changes between a transfer and its resumption restarts it from zero.
    A file that was verified before (its marker matches size and mtime) is not touched. Raises
    :class:`DownloadError`; on a size/checksum mismatch the file is removed first.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if is_verified(dest, spec):
        log.info("%s: already downloaded and verified", dest)
        return dest
    if dest.exists():  # present but never verified here (copied in by hand?): check it once
        if _verify(dest, spec, verify_checksums, progress, remove=False):
            return dest
        log.warning("%s: does not match the published size/checksum; downloading it again", dest)
        dest.unlink()
    part = _PartFile(dest.with_name(dest.name + ".part"), hash_md5=verify_checksums)
    declared: str | None = None  # the MD5 the server declares for the object
    if spec.size is not None and part.offset > spec.size:
        log.warning("%s: partial file is longer than the archive; starting over", part.path)
        part.reset()
    attempts = max(0, retries) + 1
    last: str = ""
    session = requests.Session()
    bar = tqdm(
        total=spec.size,
        initial=part.offset,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=dest.name,
        position=position,
        leave=True,
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        attempt = 0
        while True:
            attempt += 1
            part.sync()
            try:
                if spec.size is not None:
                    _ensure_space(dest.parent, spec.size - part.offset, f"the rest of {dest.name}")
                code, total, chunks, close, server_md5 = _open_stream(url, part.offset, timeout_s, session)
                try:
                    if server_md5 is not None:
                        if spec.md5 is not None and server_md5 != spec.md5:
                            part.reset()
                            raise DownloadError(
                                f"{url}: the server declares md5 {server_md5}, the published one of "
                                f"{spec.name} is {spec.md5}; nothing was kept"
                            )
                        changed = declared is not None and server_md5 != declared
                        declared = server_md5
                        if changed and part.offset:
                            raise _Restart(f"{url}: the object changed on the server while downloading")
                    if code == 416:
                        if total is not None and total == part.offset:
                            break  # already complete
                        raise _Restart(f"{url}: range from byte {part.offset} not satisfiable (size {total})")
                    if code == 200 and part.offset:
                        log.warning("%s: server ignored the Range request; restarting from byte 0", url)
                        part.reset()
                        bar.reset(total=spec.size)
                    if code == 200 and total is not None and spec.size is not None and total != spec.size:
                        raise DownloadError(
                            f"{url}: server reports {total} bytes, the published size of {spec.name} is {spec.size}"
                        )
                    part.append(chunks, bar)
                finally:
                    close()
                if total is not None and part.offset < total:
                    raise _Retryable(f"connection to {url} ended at byte {part.offset} of {total}")
                break
            except _Restart as e:
                last = str(e)
                log.warning("%s; restarting from zero", e)
                part.reset()
                bar.reset(total=spec.size)
                if attempt >= attempts:
                    raise DownloadError(f"{last} (gave up after {attempts} attempts)") from None
            except _Retryable as e:
                last = str(e)
                if attempt >= attempts:
                    raise DownloadError(
                        f"{last}; gave up after {attempts} attempts (data.download.retries={retries}, "
                        f"timeout_s={timeout_s:g}). {_human(part.offset)} are kept in {part.path}; "
                        "re-run to resume."
                    ) from None
                wait = backoff_s * (2 ** (attempt - 1))
                log.warning(
                    "%s; retry %d/%d in %.1fs (resuming at byte %d)",
                    last,
                    attempt,
                    attempts - 1,
                    wait,
                    part.offset,
                )
                time.sleep(min(wait, 30.0))
            except OSError as e:
                if _is_enospc(e):
                    raise DownloadError(
                        f"disk full (ENOSPC) while writing {part.path} at byte {part.offset}: free space "
                        f"in {dest.parent} and re-run (the partial file is kept and will resume)"
                    ) from None
                raise
    finally:
        bar.close()
        session.close()

    # verify, then publish
    size = part.path.stat().st_size if part.path.exists() else 0
    if spec.size is not None and size != spec.size:
        part.reset()
        raise DownloadError(
            f"{dest.name}: size mismatch: got {size} bytes, expected {spec.size}; the file was removed"
        )
    digest = part.md5.hexdigest() if part.md5 is not None else None
    expected = spec.md5 or declared
    if verify_checksums and expected is not None and digest != expected:
        part.reset()
        source = "published" if spec.md5 else "declared by the server"
        raise DownloadError(
            f"{dest.name}: checksum mismatch: md5 {digest}, expected {expected} ({source}; from {url}); "
            "the file was removed"
        )
    os.replace(part.path, dest)
    _write_verified(dest, digest)
    log.info("%s: downloaded and verified (%s)", dest, _human(size))
    return dest


def _verify(dest: Path, spec: ArchiveSpec, verify_checksums: bool, progress: bool, remove: bool) -> bool:
    size = dest.stat().st_size
    if spec.size is not None and size != spec.size:
        ok = False
        digest = None
    else:
        digest = md5_file(dest, progress) if (verify_checksums and spec.md5) else None
        ok = digest is None or digest == spec.md5
    if ok:
        _write_verified(dest, digest)
    elif remove:
        dest.unlink()
    return ok


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
    _ensure_space(dest, sum(i.file_size for i in infos), f"extracting {zip_path.name}")
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
        if _is_enospc(e):
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
                shutil.copyfileobj(src, out, _CHUNK)


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
            out.update((f, name) for f in _extracted_files(_read_json(marker), root))
    return out


def _extract_once(zip_path: Path, root: Path, key: dict, select=None, progress: bool = True) -> bool:
    """Extract unless the marker says the same archive (``key``) is already extracted. True if it ran."""
    marker = _extract_marker(root, zip_path.name)
    m = _read_json(marker)
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
    m = _read_json(marker)
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
        m = _read_json(_marker_path(paths[name])) or {}
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
            "annotations": (_read_json(_marker_path(paths[ANNOTATIONS_ZIP])) or {}).get("md5"),
        }
        if n_train > 0:  # the images this archive extracted (not whatever else is in the folder)
            extracted = _extracted_files(_read_json(_extract_marker(root, TRAIN_ZIP)), root)
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
