"""Canvases in, detections out: the one place :func:`~pix2seq.decoding.generate` meets
:func:`~pix2seq.tokenizer.tokens_to_detections`, shared by evaluation (:mod:`pix2seq.engine`) and
inference on raw images (:mod:`pix2seq.inference`, the served model)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pix2seq.config import Config
from pix2seq.decoding import generate
from pix2seq.tokenizer import tokens_to_detections
from pix2seq.vocab import Vocab


def detect(
    model: nn.Module,
    canvas: Tensor,
    vocab: Vocab,
    cfg: Config,
    scale: Tensor,
    orig_size: Tensor,
    autocast_dtype: torch.dtype | None = None,
) -> list[dict[str, Tensor]]:
    """Decode ``cfg.tokenizer.max_instances`` objects per image as ``cfg.eval`` says.

    Args:
        canvas: ``(B, 3, S, S)`` padded canvases (uint8, or float in [0, 1] with ``model.pixels:
            official``), on the model's device.
        scale: ``(B,)`` canvas pixels per original pixel; orig_size: ``(B, 2)`` (height, width).
    Returns:
        B dicts (on the CPU) with ``boxes`` ``(M, 4)`` xyxy in original pixels, ``labels`` ``(M,)``
        (contiguous 0..C-1) and ``scores`` ``(M,)``, ranked by score.
    """
    ecfg = cfg.eval
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
        autocast_dtype=autocast_dtype,
    )
    return tokens_to_detections(
        out.tokens.cpu(),
        out.class_probs.float().cpu(),
        vocab,
        canvas.shape[-1],
        scale,
        orig_size,
        coords=out.coords.cpu(),
    )
