"""Atomic file writes, in one place: readers (DVC, MLflow, a resumed run) never see half a file.

Every writer goes through a temporary file in the target's directory, ``fsync`` and ``os.replace``;
on any failure the previous file stays as it was and the temporary file is removed::

    atomic_write_text(path, text)
    with atomic_path("reports/pr_curve.png") as tmp:    # a library writes to tmp (same suffix)
        fig.savefig(tmp)
    atomic_link(ckpt, manager.last_path)                # a hard link (or copy) swapped in
    atomic_symlink(target, link)                        # a symbolic link swapped in
    replace_dir(complete_tmp_dir, final_dir)            # a directory written aside, then swapped in
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

PathLike = str | os.PathLike[str]


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(directory: PathLike) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so savers pick the format); when the block
    ends without an error the file is synced and renamed to ``path``, else removed."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=p.parent, prefix=f".{p.stem}.", suffix=f".tmp{p.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give it a normal file's mode
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_link(src: PathLike, dst: PathLike) -> None:
    """Point ``dst`` at ``src``'s content: a hard link where the file system allows (no extra disk),
    else a copy; swapped in atomically."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def atomic_symlink(target: PathLike, link: PathLike) -> None:
    """Point the symbolic link ``link`` at ``target`` (replacing an older link in one step)."""
    link = Path(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.link-tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp, target_is_directory=Path(target).is_dir())
    os.replace(tmp, link)


def replace_dir(new: PathLike, final: PathLike) -> None:
    """Swap the complete directory ``new`` in as ``final`` (the old one, if any, is removed after)."""
    new, final = Path(new), Path(final)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)
