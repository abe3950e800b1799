"""The token vocabulary: one layout, derived from the number of categories and ``bins``.

Compact layout (spec section 1, "ours")::

    0                      PAD = EOS (padding and end of sequence share one id)
    1                      PROMPT (the detection task's start token)
    2                      NOISE (the class of sequence-augmentation fake objects)
    3 .. 3+C-1             one token per category (contiguous label 0..C-1)
    3+C .. 3+C+bins-1      quantised coordinates q in [0, bins-1]
    (vocab_size may be larger than needed; the tail ids are never produced)

Ranges are derived, never hard-coded per dataset, and their disjointness is asserted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pix2seq.config import ConfigError

PAD = 0
EOS = 0
PROMPT = 1
NOISE = 2
NUM_SPECIALS = 3


@dataclass(frozen=True)
class Vocab:
    num_classes: int
    bins: int
    vocab_size: int = 0  # 0: exactly what the layout needs

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ConfigError(f"data: need at least one category, got {self.num_classes}")
        if self.bins < 2:
            raise ConfigError(f"tokenizer.bins: must be >= 2, got {self.bins}")
        need = NUM_SPECIALS + self.num_classes + self.bins
        if self.vocab_size == 0:
            object.__setattr__(self, "vocab_size", need)
        elif self.vocab_size < need:
            raise ConfigError(
                f"tokenizer.vocab_size: {self.vocab_size} cannot hold {self.num_classes} categories + "
                f"{self.bins} bins + {NUM_SPECIALS} special tokens (needs {need})"
            )
        specials = set(range(NUM_SPECIALS))
        classes = set(range(self.class_start, self.class_end))
        coords = set(range(self.coord_start, self.coord_end))
        assert not (specials & classes) and not (classes & coords) and not (specials & coords)
        assert self.coord_end <= self.vocab_size
        assert {PAD, PROMPT, NOISE} <= specials

    # ranges are half-open [start, end)
    @property
    def class_start(self) -> int:
        return NUM_SPECIALS

    @property
    def class_end(self) -> int:
        return NUM_SPECIALS + self.num_classes

    @property
    def coord_start(self) -> int:
        return self.class_end

    @property
    def coord_end(self) -> int:
        return self.coord_start + self.bins

    # ------------------------------------------------------------------ conversions (tensors)
    def label_to_token(self, labels: torch.Tensor) -> torch.Tensor:
        """Contiguous labels (..., ) in [0, C) -> class tokens."""
        return labels + self.class_start

    def token_to_label(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens - self.class_start

    def quantize(self, coords01: torch.Tensor) -> torch.Tensor:
        """Coordinates normalised to [0, 1] by the padded canvas -> coordinate tokens (long)."""
        q = torch.round(coords01.clamp(0.0, 1.0) * (self.bins - 1)).long()
        return q.clamp_(0, self.bins - 1) + self.coord_start

    def dequantize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Coordinate tokens -> coordinates in [0, 1] (float)."""
        q = (tokens - self.coord_start).clamp(0, self.bins - 1)
        return q.float() / (self.bins - 1)

    def is_class(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens >= self.class_start) & (tokens < self.class_end)

    def is_coord(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens >= self.coord_start) & (tokens < self.coord_end)

    def allowed_mask(self, kind: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool mask (vocab_size,) of the tokens allowed at a ``'coord'`` or ``'class'`` position.

        Class positions admit the real classes and NOISE (constrained decoding, spec section 5).
        """
        m = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
        if kind == "coord":
            m[self.coord_start : self.coord_end] = True
        elif kind == "class":
            m[self.class_start : self.class_end] = True
            m[NOISE] = True
        else:
            raise ValueError(f"unknown position kind {kind!r}")
        return m
