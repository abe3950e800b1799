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

    ``coord_sigma > 0`` (with ``coord_tokens = (start, end)``, the coordinate token range) replaces
    a coordinate target's one-hot by a Gaussian over the coordinate bins, std ``coord_sigma`` bins
    around the true bin, normalised (tokenizer.coord_sigma; not in the paper).
    """

    def __init__(
        self,
        label_smoothing: float = 0.0,
        eps: float = 1e-6,
        coord_sigma: float = 0.0,
        coord_tokens: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.eps = eps
        self.coord_tokens = coord_tokens
        kernel = torch.zeros(0, 0)
        if coord_sigma > 0:
            if coord_tokens is None:
                raise ValueError("coord_sigma needs coord_tokens")
            bins = torch.arange(coord_tokens[1] - coord_tokens[0], dtype=torch.float32)
            kernel = (-0.5 * ((bins[None] - bins[:, None]) / coord_sigma) ** 2).softmax(-1)  # (nb, nb)
        self.register_buffer("kernel", kernel, persistent=False)

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
            if self.kernel.numel():
                ce = self._soft_coordinates(logits, targets, ce)
            return (ce * w).sum() / w.sum().clamp_min(self.eps)

    def _soft_coordinates(self, logits: Tensor, targets: Tensor, ce: Tensor) -> Tensor:
        """``ce (B*T,)`` with the coordinate targets' rows replaced by the soft-target cross-entropy
        (a mask, not an index: no device synchronisation)."""
        start, end = self.coord_tokens
        flat = targets.reshape(-1)
        logp = logits.float().reshape(-1, logits.shape[-1]).log_softmax(-1)[:, start:end]  # (B*T, nb)
        q = self.kernel.to(logp.device)[(flat - start).clamp(0, end - start - 1)]  # (B*T, nb)
        return torch.where((flat >= start) & (flat < end), -(q * logp).sum(-1), ce)
