"""Canvases in, detections out: the one place :func:`~pix2seq.decoding.generate` meets
:func:`~pix2seq.tokenizer.tokens_to_detections`, shared by evaluation (:mod:`pix2seq.engine`) and
inference on raw images (:mod:`pix2seq.inference`, the served model).

:func:`detect` waits for the result; :func:`decode` returns as soon as the decode is queued, and
its :meth:`Decoded.detections` finishes the job (evaluation runs that on a second thread while the
next batch decodes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pix2seq.config import Config
from pix2seq.decoding import generate
from pix2seq.precision import Choice
from pix2seq.tokenizer import tokens_to_detections
from pix2seq.vocab import Vocab


@dataclass
class Decoded:
    """A decoded batch on its way to the host: :meth:`detections` waits for the copies (queued
    behind the decode, so the caller's thread can launch the next batch) and reads the boxes."""

    tokens: Tensor  # (B, 5M) long, on the CPU once ``ready``
    class_probs: Tensor  # (B, M, C) float32
    coords: Tensor  # (B, M, 4) float32, bins
    ready: torch.cuda.Event | None  # recorded after the copies (CUDA); None: already on the host
    vocab: Vocab
    canvas_size: int
    scale: Tensor
    orig_size: Tensor
    compile_s: float  # building the compiled decode step in this call (0.0: reused, or eager)

    def detections(self) -> list[dict[str, Tensor]]:
        if self.ready is not None:
            self.ready.synchronize()
        return tokens_to_detections(
            self.tokens,
            self.class_probs,
            self.vocab,
            self.canvas_size,
            self.scale,
            self.orig_size,
            coords=self.coords,
        )


def decode(
    model: nn.Module,
    canvas: Tensor,
    vocab: Vocab,
    cfg: Config,
    scale: Tensor,
    orig_size: Tensor,
    precision: Choice | None = None,
) -> Decoded:
    """Decode ``cfg.tokenizer.max_instances`` objects per image as ``cfg.eval`` says, without
    waiting for the device: the outputs' copies to the host are queued behind the decode.

    Args:
        canvas: ``(B, 3, S, S)`` padded canvases (uint8, or float in [0, 1] with ``model.pixels:
            official``), on the model's device.
        scale: ``(B,)`` canvas pixels per original pixel; orig_size: ``(B, 2)`` (height, width).
        precision: the encoder's autocast dtype and the decode step's for this many rows
            (:func:`pix2seq.precision.choose`); None: float32.
    """
    ecfg = cfg.eval
    amp = precision.dtype if precision is not None else None
    rows = canvas.shape[0] * (ecfg.beam_size if ecfg.decoding == "beam" else 1)
    out = generate(
        model,
        canvas,
        vocab,
        cfg.tokenizer.max_instances,
        method=ecfg.decoding,
        top_p=ecfg.top_p,
        temperature=ecfg.temperature,
        beam_size=ecfg.beam_size,
        constrained=ecfg.constrained,
        coord_window=ecfg.coord_window,
        autocast_dtype=amp,
        step=ecfg.step,
        step_autocast=amp is not None and precision.step_dtype(rows) is not None,
    )
    host = [t.to("cpu", non_blocking=True) for t in (out.tokens, out.class_probs.float(), out.coords)]
    ready = None
    if canvas.is_cuda:
        ready = torch.cuda.Event()
        ready.record()
    return Decoded(*host, ready, vocab, canvas.shape[-1], scale, orig_size, out.compile_s)


def detect(*args, **kwargs) -> list[dict[str, Tensor]]:
    """:func:`decode` (same arguments), waited for: B dicts (on the CPU) with ``boxes`` ``(M, 4)``
    xyxy in original pixels, ``labels`` ``(M,)`` (contiguous 0..C-1) and ``scores`` ``(M,)``,
    ranked by score."""
    return decode(*args, **kwargs).detections()
