"""Reading files a user names (images, checkpoints, config files): regular files only.

A FIFO, a device, a socket or a directory given where a file is expected is refused without being
read: reading a FIFO blocks forever, a device never ends. The file is checked with ``stat`` before
it is opened and again with ``fstat`` on the opened descriptor (opened non-blocking, so even a FIFO
that appears in between cannot hang the open), so a file swapped in between is caught too.
Failures are :class:`FileReadError`, one line in the user's terms: no such file, not readable
(permission denied), a FIFO, a directory, empty file.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from typing import BinaryIO

from pix2seq.errors import Pix2SeqError


class FileReadError(Pix2SeqError, OSError):
    """A named file that cannot be read as a regular file; the message names it and says why."""


def _kind(mode: int) -> str | None:
    """None for a regular file, else what it is, in words."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _refuse(name: str, kind: str) -> FileReadError:
    return FileReadError(f"{name}: is {kind}, not a regular file; refused (not read)")


def _os_error(name: str, e: OSError) -> FileReadError:
    if isinstance(e, FileNotFoundError):
        return FileReadError(f"{name}: no such file")
    if isinstance(e, PermissionError):
        return FileReadError(f"{name}: not readable (permission denied)")
    return FileReadError(f"{name}: not readable ({(e.strerror or str(e)).lower()})")


def regular_file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a readable regular file (``"no such file"``, ``"is a FIFO ..."``), or None."""
    try:
        check_regular(path)
    except FileReadError as e:
        return str(e).removeprefix(f"{path}: ")
    return None


def check_regular(path: str | os.PathLike[str]) -> os.stat_result:
    """``stat`` of ``path`` when it is a regular file (symlinks followed), else :class:`FileReadError`."""
    name = str(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise _os_error(name, e) from None
    kind = _kind(st.st_mode)
    if kind is not None:
        raise _refuse(name, kind)
    return st


@contextlib.contextmanager
def open_regular(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open ``path`` for binary reading if (and only if) it is a regular file."""
    name = str(path)
    check_regular(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise _os_error(name, e) from None
    try:
        kind = _kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise _refuse(name, kind)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def read_regular(path: str | os.PathLike[str], allow_empty: bool = False) -> bytes:
    """The bytes of the regular file ``path``; an empty file is an error unless ``allow_empty``."""
    try:
        with open_regular(path) as f:
            data = f.read()
    except FileReadError:
        raise
    except OSError as e:
        raise _os_error(str(path), e) from None
    if not data and not allow_empty:
        raise FileReadError(f"{path}: empty file (0 bytes)")
    return data
