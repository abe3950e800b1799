"""Files over HTTP(S) or ``file://``: resumable downloads verified against a size and an MD5.

:func:`download_file` fetches one object into ``dest``: it resumes ``dest.part`` with an HTTP
``Range`` request (a server that ignores ranges is detected and the file restarts from zero),
retries timeouts and dropped connections, keeps the MD5 in step with the bytes on disk, checks the
result against the :class:`ArchiveSpec`'s size and MD5 or, where none is given, the MD5 the server
declares for the object (Google Cloud Storage's ``x-goog-hash: md5=<base64>``), and publishes it
atomically with a ``.verified.json`` marker, so a verified file is never fetched or hashed again.
A mismatch removes the file and raises :class:`DownloadError` with both values; so do HTTP errors,
a full disk (ENOSPC) and exhausted retries, naming the URL or file. Used by the COCO download stage
(:mod:`pix2seq.data.download`) and the official weights (:mod:`pix2seq.weights.official`).
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
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests
import urllib3
from tqdm import tqdm

from pix2seq.atomic import atomic_write_text
from pix2seq.errors import Pix2SeqError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
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


# ------------------------------------------------------------------------------------ helpers


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def ensure_space(directory: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if need > 0 and free < need + _SPACE_MARGIN:
        raise DownloadError(
            f"not enough disk space in {directory} for {what}: need {_human(need)} "
            f"(+{_human(_SPACE_MARGIN)} margin), {_human(free)} free (ENOSPC)"
        )


def is_enospc(e: BaseException) -> bool:
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
        while chunk := f.read(CHUNK * 8):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _marker_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verified.json")


def read_marker(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, json.JSONDecodeError):
        return None


def verified_record(dest: Path) -> dict | None:
    """What :func:`download_file` recorded when it verified ``dest`` (size, md5, mtime_ns), or None."""
    return read_marker(_marker_path(dest))


def is_verified(dest: Path, spec: ArchiveSpec) -> bool:
    """True when ``dest`` carries a marker written after verification and is unchanged since."""
    m = verified_record(dest)
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
                while chunk := f.read(CHUNK * 8):
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
            while chunk := f.read(CHUNK):
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
            while chunk := raw.read1(CHUNK, decode_content=False):
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
        if _verify(dest, spec, verify_checksums, progress):
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
                    ensure_space(dest.parent, spec.size - part.offset, f"the rest of {dest.name}")
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
                if is_enospc(e):
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


def _verify(dest: Path, spec: ArchiveSpec, verify_checksums: bool, progress: bool) -> bool:
    size = dest.stat().st_size
    if spec.size is not None and size != spec.size:
        ok = False
        digest = None
    else:
        digest = md5_file(dest, progress) if (verify_checksums and spec.md5) else None
        ok = digest is None or digest == spec.md5
    if ok:
        _write_verified(dest, digest)
    return ok
