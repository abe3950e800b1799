"""User-facing errors and the one way every entry point reports them.

A :class:`Pix2SeqError` is something the user can fix: a bad config value, a missing or damaged
file, a dataset prepare cannot use. Its message is one line that names the key or the file and says
what to do (``train.lr: must be positive, got -0.001``). The library raises it (or a subclass:
``ConfigError``, ``PrepareError``, ``CheckpointError``, ...); entry points never format it
themselves but run through :func:`run_entry_point`, which prints it as ``<prog>: error: <message>``
on stderr and exits with status 2, the traceback only when ``PIX2SEQ_DEBUG=1``. Anything else (a
bug) keeps its traceback.

This module imports nothing from ``pix2seq``, so every layer can raise its errors.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

EXIT_USAGE = 2  # a bad config, file or input: what argparse uses for usage errors too
EXIT_INTERRUPTED = 130
DEBUG_ENV = "PIX2SEQ_DEBUG"


class Pix2SeqError(Exception):
    """An error the user can fix; the message is one line naming the key or file and what to do."""


def one_line(message: str) -> str:
    """``message`` on one line: its non-empty lines joined with ``"; "``."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    return "; ".join(lines)


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (a library's can run to pages)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def describe_error(e: BaseException) -> str:
    """The one-line message for an error :func:`run_entry_point` reports."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None and getattr(e, "problem", None):  # a yaml.MarkedYAMLError from a library call
        where = f"{mark.name}: " if mark.name and not mark.name.startswith("<") else ""
        return f"{where}not valid YAML: {e.problem} (line {mark.line + 1}, column {mark.column + 1})"
    if isinstance(e, OSError) and not isinstance(e, Pix2SeqError) and e.strerror:
        # "[Errno 13] Permission denied: 'x'" -> "x: permission denied"
        what = e.strerror[0].lower() + e.strerror[1:]
        return f"{e.filename}: {what}" if e.filename is not None else what
    return one_line(str(e)) or type(e).__name__


def _reportable(e: BaseException) -> bool:
    if isinstance(e, Pix2SeqError | OSError):
        return True
    # yaml.YAMLError, without importing yaml here (a cheap check on the class's module)
    return any(c.__module__.split(".")[0] == "yaml" for c in type(e).__mro__)


def run_entry_point(prog: str, fn: Callable[[], int | None]) -> int:
    """Run ``fn`` (an entry point's body) and return its exit status.

    A :class:`Pix2SeqError`, an ``OSError`` or a YAML error becomes ``"<prog>: error: <message>"`` on
    stderr and status 2 (with the traceback when ``PIX2SEQ_DEBUG=1``); Ctrl-C is status 130;
    ``SystemExit`` (argparse, ``-h``) passes through; anything else propagates with its traceback.
    """
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if not _reportable(e):
            raise
        if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
            traceback.print_exc()
        print(f"{prog}: error: {describe_error(e)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
