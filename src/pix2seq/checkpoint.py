"""Checkpoints: atomic saves, ``weights_only`` loads, RNG state, step/last/best bookkeeping.

A checkpoint is a plain ``dict`` written by :func:`torch.save`. Everything in it must be loadable
with ``torch.load(path, weights_only=True)``: tensors, ``dict``/``list``/``tuple``/``set``, ``str``,
``bytes``, ``int``, ``float``, ``bool``, ``None`` (plus ``torch.Size``/``dtype``/``device``). That
rule means a checkpoint can never execute code when it is read, and :func:`save_checkpoint` checks
it *before* writing so a bad value fails at save time (naming its key), not hours later at resume.

The training engine's layout::

    {"model", "optimizer", "scheduler",                      # state_dict()s
     "rng": capture_rng_state(),
     "epoch", "step_in_epoch", "global_step", "best_metric",
     "config": cfg.to_dict(),
     "vocab": Vocab.to_dict(): {"num_classes", "bins", "vocab_size", "layout", "category_ids"},
     "categories": [{"id", "name"}, ...]}

Files written by :class:`CheckpointManager` in its directory::

    ckpt-<global_step>.pt   the newest ``keep`` step checkpoints
    last.pt                 the most recent save (what ``resume`` reads)
    best.pt                 the save with the best validation metric

Every file appears atomically (:mod:`pix2seq.atomic`), so a crash or a full disk mid-write leaves
the previous file intact and never a half-written one.
"""

from __future__ import annotations

import logging
import os
import random
import re
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pix2seq.atomic import atomic_link, atomic_path
from pix2seq.config import Config, ConfigError, config_from_dict
from pix2seq.errors import Pix2SeqError
from pix2seq.files import FileReadError, open_regular

log = logging.getLogger(__name__)

__all__ = [
    "MODEL_ENTRIES",
    "TRAINING_ENTRIES",
    "CheckpointError",
    "CheckpointManager",
    "check_entries",
    "config_from_checkpoint",
    "capture_rng_state",
    "check_weights_only_safe",
    "export_model_file",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

PathLike = str | os.PathLike[str]


class CheckpointError(Pix2SeqError, RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file (or the key)."""


# ------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """The state of every global RNG of this process, as ``weights_only``-safe values.

    Covers Python's :mod:`random`, NumPy's legacy global generator (``np.random.*``), torch's CPU
    generator and the generators of all visible CUDA devices (when CUDA is available). Under DDP
    each rank has its own state; gather them (``distributed.all_gather_object``) if every rank
    must resume exactly.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": None if py_gauss is None else float(py_gauss),
        },
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any] | Sequence[Mapping[str, Any]], rank: int = 0) -> None:
    """Restore what :func:`capture_rng_state` returned (also after a ``weights_only`` load).

    ``state`` may also be a per-rank list (``all_gather_object(capture_rng_state())`` saved by
    rank 0): this process then takes entry ``rank % len(state)``, so DDP ranks keep distinct streams
    across a resume. CUDA states are restored for ``min(saved, visible)`` devices; a mismatch (a
    checkpoint from a GPU machine resumed on CPU, another device count) is warned about, not fatal.
    """
    if isinstance(state, list | tuple):
        if not state:
            raise ValueError("restore_rng_state: empty per-rank list")
        state = state[rank % len(state)]
    py = state["python"]
    internal = tuple(int(x) for x in torch.as_tensor(py["internal"]).tolist())
    random.setstate((int(py["version"]), internal, py["gauss_next"]))

    nps = state["numpy"]
    keys = torch.as_tensor(nps["keys"]).numpy().astype(np.uint32)
    np.random.set_state(
        (str(nps["name"]), keys, int(nps["pos"]), int(nps["has_gauss"]), float(nps["cached_gaussian"]))
    )

    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())

    cuda_states = list(state.get("cuda") or [])
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda_states and visible:
        n = min(len(cuda_states), visible)
        for i in range(n):
            torch.cuda.set_rng_state(torch.as_tensor(cuda_states[i], dtype=torch.uint8).cpu(), device=i)
    if len(cuda_states) != visible and (cuda_states or visible):
        warnings.warn(
            f"checkpoint has CUDA RNG state for {len(cuda_states)} device(s), this process sees {visible}; "
            "restored the common ones only",
            RuntimeWarning,
            stacklevel=2,
        )


# ------------------------------------------------------------------------------ safety checking

_SAFE_LEAVES: tuple[type, ...] = (
    str,
    bytes,
    int,
    float,
    bool,
    complex,
    type(None),
    torch.device,
    torch.dtype,
)


def check_weights_only_safe(obj: Any, where: str = "state") -> None:
    """Raise :class:`CheckpointError` naming the first value ``torch.load(weights_only=True)`` rejects.

    Checks exact types (a ``numpy.float64``, a dataclass, an ``Enum`` or a ``defaultdict`` all fail),
    so ``best_metric = float(ap)`` and ``config = cfg.to_dict()`` are what callers must store.
    """
    stack: list[tuple[Any, str]] = [(obj, where)]
    seen: set[int] = set()
    while stack:
        x, path = stack.pop()
        t = type(x)
        if isinstance(x, torch.Tensor) or t in _SAFE_LEAVES or t is torch.Size:
            continue
        if id(x) in seen:
            continue
        if t is dict or t is OrderedDict:
            seen.add(id(x))
            for k, v in x.items():
                if type(k) not in _SAFE_LEAVES and not isinstance(k, tuple):
                    raise CheckpointError(f"{path}: key {k!r} of type {t.__name__} is not weights_only-safe")
                stack.append((v, f"{path}[{k!r}]"))
            continue
        if t is list or t is tuple or t is set:
            seen.add(id(x))
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(x))
            continue
        raise CheckpointError(
            f"{path}: {t.__module__}.{t.__qualname__} cannot be loaded with torch.load(weights_only=True); "
            "store plain dict/list/str/int/float/bool/None or tensors (e.g. float(x), cfg.to_dict())"
        )


# ----------------------------------------------------------------------------------- save / load


def save_checkpoint(path: PathLike, state: Mapping[str, Any], *, check: bool = True) -> Path:
    """Write ``state`` to ``path`` atomically: a temp file beside it, ``fsync``, ``os.replace``.

    On any failure (unpicklable value, full disk, interrupt) the previous ``path`` is untouched and
    the temporary file is removed. ``check`` first runs :func:`check_weights_only_safe`.
    """
    p = Path(path)
    if check:
        check_weights_only_safe(dict(state))
    with atomic_path(p) as tmp:
        torch.save(dict(state), tmp)
    return p


# What a model file (the slim model.pt) and a training checkpoint hold, by entry and type.
MODEL_ENTRIES = ("model", "config", "vocab", "categories")
TRAINING_ENTRIES = (*MODEL_ENTRIES, "optimizer", "scheduler", "rng", "epoch", "global_step")
_ENTRY_TYPES: dict[str, tuple[type, ...]] = {
    "model": (dict, OrderedDict),
    "config": (dict,),
    "vocab": (dict,),
    "categories": (list,),
    "optimizer": (dict,),
    "scheduler": (dict,),
    "rng": (list, dict),
    "epoch": (int,),
    "global_step": (int,),
}
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format is a zip archive


def _load_failure(e: Exception, head: bytes, size: int) -> str:
    """What a failed ``torch.load(weights_only=True)`` means, in the user's terms (torch's own
    message suggests ``weights_only=False``: the one thing never to do with a file that fails here)."""
    text = str(e)
    # random bytes also fail as "Weights only load failed" (an unknown pickle opcode): only a
    # reference to a Python global means a pickle that wants to build objects
    if "unsupported global" in text.lower():
        m = re.search(r"(?i)unsupported global:?\s+(?:GLOBAL\s+)?([\w.]+)", text)
        what = f" ({m.group(1)})" if m else ""
        return (
            f"refused: it holds Python objects{what}, not only tensors and plain data; loading it could "
            "run code, and no checkpoint pix2seq writes does"
        )
    if head.startswith(_ZIP_MAGIC):
        return f"corrupt or truncated checkpoint ({size} bytes); write it again or use an earlier one"
    return f"not a checkpoint (not a file torch.save writes; {size} bytes)"


def check_entries(state: Mapping[str, Any], path: PathLike, names: Sequence[str]) -> None:
    """Raise :class:`CheckpointError` naming ``path`` when an entry in ``names`` is missing or of the
    wrong type (a file from another program, or a crafted one)."""
    for name in names:
        if name not in state:
            raise CheckpointError(f"{path}: not a pix2seq checkpoint (no '{name}' entry)")
        want = _ENTRY_TYPES.get(name)
        value = state[name]
        if want is not None and (not isinstance(value, want) or isinstance(value, bool)):
            raise CheckpointError(
                f"{path}: not a pix2seq checkpoint (entry '{name}' is a {type(value).__name__}, "
                f"expected a {' or '.join('mapping' if t in (dict, OrderedDict) else t.__name__ for t in want)})"
            )


def load_checkpoint(
    path: PathLike, map_location: str | torch.device | None = "cpu", required: Sequence[str] = ()
) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (never runs code from the file).

    Only a regular file is read (a FIFO or device is refused, see :mod:`pix2seq.files`). Raises
    ``FileNotFoundError`` for a missing file and :class:`CheckpointError` naming the file when it
    is not readable, empty, not a checkpoint, corrupt or truncated, holds objects a safe load
    refuses, or lacks one of the ``required`` entries (e.g. :data:`MODEL_ENTRIES`).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: checkpoint not found")
    try:
        with open_regular(p) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(len(_ZIP_MAGIC))
            if not head:
                raise CheckpointError(f"{p}: empty file (0 bytes), not a checkpoint")
            f.seek(0)
            try:
                state = torch.load(f, map_location=map_location, weights_only=True)
            except Exception as e:  # zip/pickle errors come as RuntimeError, UnpicklingError, EOFError...
                raise CheckpointError(f"{p}: {_load_failure(e, head, size)}") from e
    except FileReadError as e:
        raise CheckpointError(f"{e} (expected a checkpoint)") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{p}: not a pix2seq checkpoint (holds a {type(state).__name__}, not a dict)")
    check_entries(state, p, required)
    return state


def config_from_checkpoint(
    ckpt: Mapping[str, Any],
    path: PathLike,
    overrides: list[str] | None = None,
    replace: Mapping[str, Any] | None = None,
) -> Config:
    """The config ``ckpt`` was trained with, its sections in ``replace`` swapped for the caller's,
    then ``overrides`` applied.

    A stored config that does not load (a crafted file, another version's keys) is a
    :class:`CheckpointError` naming ``path``; a bad override stays the caller's :class:`ConfigError`.
    """
    check_entries(ckpt, path, ("config",))
    values = {**ckpt["config"], **(replace or {})}
    try:
        cfg = config_from_dict(values)
    except ConfigError as e:
        raise CheckpointError(f"{path}: its stored config does not load here ({e})") from None
    return config_from_dict(values, overrides) if overrides else cfg


def export_model_file(checkpoint: PathLike, dest: PathLike) -> Path:
    """A training checkpoint -> a slim model file (weights in fp32, config, vocab, categories; no
    optimizer, scheduler or RNG state): ``model.pt``, what predict and the served model load."""
    ckpt = load_checkpoint(checkpoint, map_location="cpu", required=MODEL_ENTRIES)
    slim = {k: ckpt[k] for k in MODEL_ENTRIES}
    slim.update({k: ckpt[k] for k in ("global_step", "best_metric") if k in ckpt})
    slim["model"] = {k: v.float() if torch.is_floating_point(v) else v for k, v in slim["model"].items()}
    return save_checkpoint(dest, slim)


# --------------------------------------------------------------------------------------- manager

_STEP_RE = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointManager:
    """Step checkpoints plus ``last.pt``/``best.pt`` in one directory, pruned to the newest ``keep``.

    >>> mgr = CheckpointManager("runs/train/checkpoints", keep=2)
    >>> mgr.save(state, step=global_step, is_best=ap > best)     # doctest: +SKIP
    >>> path = mgr.latest()                                       # resume: last.pt or newest step
    """

    LAST = "last.pt"
    BEST = "best.pt"

    def __init__(self, directory: PathLike, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.dir = Path(directory)
        self.keep = int(keep)

    # paths
    @property
    def last_path(self) -> Path:
        return self.dir / self.LAST

    @property
    def best_path(self) -> Path:
        return self.dir / self.BEST

    @property
    def best_or_last_path(self) -> Path:
        """The best checkpoint where one was kept, else the last."""
        return self.best_path if self.best_path.exists() else self.last_path

    def step_path(self, step: int) -> Path:
        return self.dir / f"ckpt-{int(step)}.pt"

    def step_checkpoints(self) -> list[tuple[int, Path]]:
        """``[(step, path), ...]`` sorted by step, oldest first."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_file():
                out.append((int(m.group(1)), p))
        return sorted(out)

    # writing
    def save(self, state: Mapping[str, Any], step: int, is_best: bool = False) -> Path:
        """Write ``ckpt-<step>.pt``, point ``last.pt`` (and ``best.pt`` if ``is_best``) at it, prune.

        Returns the step checkpoint's path. ``last.pt``/``best.pt`` are hard links when the file
        system allows (no extra disk), else copies; both are swapped in atomically.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        path = save_checkpoint(self.step_path(step), state)
        atomic_link(path, self.last_path)
        if is_best:
            atomic_link(path, self.best_path)
        self.prune(current=path)
        return path

    def prune(self, current: Path | None = None) -> list[Path]:
        """Delete step checkpoints beyond the newest ``keep`` (never ``current``, last or best)."""
        steps = self.step_checkpoints()
        keep = {p for _, p in steps[-self.keep :]}
        if current is not None:
            keep.add(Path(current))
        removed = []
        for _, p in steps:
            if p not in keep:
                p.unlink(missing_ok=True)
                removed.append(p)
        return removed

    # reading
    def latest(self) -> Path | None:
        """The checkpoint to resume from: ``last.pt`` if present, else the newest step file, else None."""
        if self.last_path.is_file():
            return self.last_path
        steps = self.step_checkpoints()
        return steps[-1][1] if steps else None

    def candidates(self) -> Iterator[Path]:
        """Resume candidates, most recent first: ``last.pt`` then step files newest first."""
        if self.last_path.is_file():
            yield self.last_path
        for _, p in reversed(self.step_checkpoints()):
            yield p

    def load_latest(
        self, map_location: str | torch.device | None = "cpu", required: Sequence[str] = ()
    ) -> tuple[Path, dict[str, Any]] | None:
        """Load the newest readable checkpoint, skipping (and logging) damaged ones; None if none.

        Raises :class:`CheckpointError` (one line, pointing at ``train.resume=never``) when there are
        checkpoints but none can be read.
        """
        errors = []
        for p in self.candidates():
            try:
                return p, load_checkpoint(p, map_location, required)
            except CheckpointError as e:
                log.warning("skipping unreadable checkpoint: %s", e)
                errors.append(str(e))
        if errors:
            more = f"; {len(errors) - 1} more unreadable" if len(errors) > 1 else ""
            raise CheckpointError(
                f"no readable checkpoint to resume from in {self.dir}: {errors[0]}{more}; repair or remove "
                "them, or set train.resume=never to start a new run (they are then moved aside, not deleted)"
            )
        return None
