"""Weighted sequence cross-entropy: ``sum(w * CE) / sum(w)`` over the target tokens (spec section 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SequenceLoss(nn.Module):
    """Cross-entropy over the vocabulary, weighted per target token; returns a scalar.

    ``logits (B, T, V)``, ``targets (B, T)`` long, ``weights (B, T)`` float. The cross-entropy is
    computed in float32 even under bf16 autocast; the denominator is clamped at ``eps`` so an
    all-zero-weight batch gives 0 instead of NaN.
    """

    def __init__(self, label_smoothing: float = 0.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.eps = eps

    def forward(self, logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
        if logits.shape[:-1] != targets.shape or targets.shape != weights.shape:
            raise ValueError(
                f"shapes do not match: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}, "
                f"weights {tuple(weights.shape)}"
            )
        with torch.autocast(device_type=logits.device.type, enabled=False):
            ce = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                reduction="none",
                label_smoothing=self.label_smoothing,
            )
            w = weights.float().reshape(-1)
            return (ce * w).sum() / w.sum().clamp_min(self.eps)
