"""The decode step as one unit with static shapes: a captured CUDA graph or a ``torch.compile``d step.

::

    step = compiled_step(model, memory, max_len, cross="full", repeat=1, mode="graph")
    logits = step(tokens, t)        # tokens (R,) at position t -> logits (R, V), valid until the next call
    step.reorder(index)             # beam search
    step.compile_s                  # seconds this call spent building it (0.0 when reused)

Modes (``eval.step``):

- ``"eager"``: no unit; :mod:`pix2seq.decoding` calls ``model.decode_step`` (the dynamic step, the
  fastest on CPU: every kernel there is bound by memory traffic, not by dispatch);
- ``"graph"``: the static step (:meth:`Pix2Seq.decode_step_static`) captured once as a CUDA graph and
  replayed every step: one launch instead of ~200 kernel launches (CUDA only);
- ``"compile"``: the static step compiled by ``torch.compile`` (inductor) and, on CUDA, captured
  as a CUDA graph too. On the 2-core AMD EPYC CPU of this project it measured slower than eager
  (7-10 ms against 4.5 ms a step at batch 1) after 70-100 s of compilation, so CPUs default to eager;
- ``"static"``: the static step run as it is, op by op (no capture, no compilation): what the other
  two run, for checking them and for debugging;
- ``"auto"``: ``"graph"`` on CUDA, ``"eager"`` elsewhere.

A unit is built once per shape (rows, positions, memory length, cross mode, autocast dtype) and
kept for the model (the last few shapes), so evaluation pays the capture or compilation once and
every later batch of that shape, and every later call, reuses it: :meth:`CompiledStep.start` only
reloads the image memory into its static buffers. The static step reads the module's own weights,
so in-place updates (training between evaluations) are seen; a CUDA graph is recaptured when a
weight tensor was replaced (its address changed).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections import OrderedDict

import torch
from torch import Tensor, nn

from pix2seq.config import ConfigError

STEP_MODES = ("auto", "eager", "graph", "compile", "static")
KEEP = 4  # units kept per model (an evaluation needs two: full batches and the last one)

_units: weakref.WeakKeyDictionary[nn.Module, OrderedDict] = weakref.WeakKeyDictionary()


def resolve_step_mode(mode: str, device: torch.device) -> str:
    """``auto`` -> ``graph`` on CUDA, ``eager`` elsewhere; ``graph`` without CUDA is an error."""
    if mode not in STEP_MODES:
        raise ConfigError(f"eval.step: must be one of {list(STEP_MODES)}, got {mode!r}")
    if mode == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if mode == "graph" and device.type != "cuda":
        raise ConfigError(
            f"eval.step: 'graph' captures CUDA graphs and needs a CUDA device, not {device}; use auto or eager"
        )
    return mode


class CompiledStep:
    """One model's decode step over a static :class:`StepCache` of one shape (see the module doc)."""

    def __init__(self, model, memory: Tensor, max_len: int, cross: str, repeat: int, mode: str) -> None:
        t0 = time.perf_counter()
        dev = memory.device
        self.model = weakref.ref(model)  # the registry is keyed by the model: no strong reference back
        self.mode = mode
        self.amp = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
        self.cache = model.init_cache(memory, max_len, cross=cross, repeat=repeat, static=True)
        rows = self.cache.batch_size
        self.tokens = torch.zeros(rows, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.bias = None
        if model.cfg.box_attention:
            self.bias = torch.zeros(rows, self.cache.memory_len, device=dev)
        self.fn = type(model).decode_step_static
        if mode == "compile":
            self.fn = torch.compile(self.fn, fullgraph=True, dynamic=False)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Tensor | None = None
        self.weights = _weight_addresses(model)
        if dev.type == "cuda" and mode != "static":
            self._capture()
        elif mode == "compile":
            self._run()  # compiles now, so compile_s counts it
        self.compile_s = time.perf_counter() - t0

    def _run(self) -> Tensor:
        # autocast's weight cache must be off while a graph is captured: a cached cast would be
        # freed when the caller's autocast region ends, under the graph's feet
        amp = (
            torch.autocast(self.pos.device.type, dtype=self.amp, cache_enabled=False)
            if self.amp is not None
            else contextlib.nullcontext()
        )
        with amp:
            return self.fn(self.model(), self.tokens, self.pos, self.cache, self.bias)

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph: cuBLAS handles, autotuning, compilation
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._run()

    def start(self, memory: Tensor) -> None:
        """Decode the next images: load their memory into the static buffers."""
        self.cache.reset(memory)
        if self.bias is not None:
            self.bias.zero_()

    def __call__(self, tokens: Tensor, t: int) -> Tensor:
        """``tokens (R,)`` at position ``t`` -> logits ``(R, V)`` (static memory: use them before
        the next call)."""
        cache = self.cache
        if t >= cache.max_len:
            raise ValueError(f"the cache holds {cache.max_len} positions; position {t} is past its end")
        bias = self.model().record_step_token(tokens, cache, t)
        self.tokens.copy_(tokens)
        self.pos.fill_(t)
        if self.bias is not None:  # box attention: the prior of the box just named, at class positions
            if bias is not None:
                self.bias.copy_(bias)
            elif t % 5 == 0:
                self.bias.zero_()
        cache.pos = t + 1
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.out

    def reorder(self, index: Tensor) -> None:
        self.cache.reorder(index)


def compiled_step(model, memory: Tensor, max_len: int, cross: str, repeat: int, mode: str) -> CompiledStep:
    """The model's unit for this shape, built on first use and reused afterwards, loaded with
    ``memory``; its ``compile_s`` is 0.0 when it was reused."""
    dev = memory.device.type
    amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    key = (mode, memory.shape[0], memory.shape[1], memory.dtype, memory.device, max_len, cross, repeat, amp)
    units = _units.setdefault(model, OrderedDict())
    unit = units.get(key)
    if unit is not None and unit.graph is not None and unit.weights != _weight_addresses(model):
        unit = None  # a weight was replaced: the graph reads the old one
    if unit is None:
        unit = CompiledStep(model, memory, max_len, cross, repeat, mode)
        units[key] = unit
        while len(units) > KEEP:
            units.popitem(last=False)
    else:
        units.move_to_end(key)
        unit.compile_s = 0.0
    unit.start(memory)
    return unit


def _weight_addresses(model) -> tuple[int, ...]:
    return tuple(p.data_ptr() for p in model.parameters())


__all__ = ["STEP_MODES", "CompiledStep", "compiled_step", "resolve_step_mode"]
