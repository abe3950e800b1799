"""The token vocabulary: two layouts (``tokenizer.vocab``), every range derived and asserted.

Compact layout (``compact``, spec section 1 "ours"), derived from the number of categories and
``bins``::

    0                      PAD = EOS (padding and end of sequence share one id)
    1                      PROMPT (the detection task's start token)
    2                      NOISE (the class of sequence-augmentation fake objects)
    3 .. 3+C-1             one token per category (contiguous label 0..C-1)
    3+C .. 3+C+bins-1      quantised coordinates q in [0, bins-1]
    (vocab_size may be larger than needed; the tail ids are never produced)

Official layout (``official``, google-research/pix2seq's detection vocabulary; the released
checkpoints' token ids)::

    0                      PAD = EOS
    10                     the detection prompt
    30                     NOISE ("fake class")
    100 + category id      one token per category, so ids must be < 900 (COCO: 101..190)
    1000 + q               quantised coordinates, q in [0, bins-1]
    vocab_size 3000        (the tail ids are never produced)

Code outside this module reads the ids from a :class:`Vocab` (``pad``, ``eos``, ``prompt``,
``noise``, ``class_token_ids``, ``coord_start``, ...) and never assumes either layout. Labels are
always the contiguous indices 0..C-1 of the dataset's category list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pix2seq.config import ConfigError

# the compact layout's special tokens
PAD = 0
EOS = 0
PROMPT = 1
NOISE = 2
NUM_SPECIALS = 3

LAYOUTS = ("compact", "official")

# the official layout (google-research/pix2seq: vocab.py, configs/config_det_finetune.py)
OFFICIAL_PROMPT = 10
OFFICIAL_NOISE = 30
OFFICIAL_CLASS_SHIFT = 100
OFFICIAL_COORD_SHIFT = 1000
OFFICIAL_VOCAB_SIZE = 3000


def _check_official_id(category_id: int, what: str) -> None:
    """The official layout's class token is 100 + id, below the coordinates at 1000."""
    if not 0 <= category_id < OFFICIAL_COORD_SHIFT - OFFICIAL_CLASS_SHIFT:
        raise ConfigError(
            f"tokenizer.vocab: official: category {what} has no class token (100 + id must stay below "
            f"1000, so ids 0..899); renumber the categories or use tokenizer.vocab: compact"
        )


@dataclass(frozen=True)
class Vocab:
    """Token ids of one layout.

    ``category_ids``: the dataset's category ids in label order; the official layout needs them
    (class token = 100 + id), the compact one ignores them. ``vocab_size`` 0 means what the layout
    needs (compact: exactly; official: 3000).
    """

    num_classes: int
    bins: int
    vocab_size: int = 0
    layout: str = "compact"
    category_ids: tuple[int, ...] = ()
    # derived (not part of the constructor)
    pad: int = field(init=False, default=PAD)
    eos: int = field(init=False, default=EOS)
    prompt: int = field(init=False, default=PROMPT)
    noise: int = field(init=False, default=NOISE)
    class_token_ids: tuple[int, ...] = field(init=False, default=())
    coord_start: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"tokenizer.vocab: must be one of {list(LAYOUTS)}, got {self.layout!r}")
        if self.num_classes < 1:
            raise ConfigError(f"data: need at least one category, got {self.num_classes}")
        if self.bins < 2:
            raise ConfigError(f"tokenizer.bins: must be >= 2, got {self.bins}")
        ids = tuple(int(i) for i in self.category_ids)
        object.__setattr__(self, "category_ids", ids)
        if self.layout == "compact":
            classes = tuple(range(NUM_SPECIALS, NUM_SPECIALS + self.num_classes))
            specials = (PAD, PROMPT, NOISE)
            coord_start = NUM_SPECIALS + self.num_classes
            need = coord_start + self.bins
            holds = f"{self.num_classes} categories + {self.bins} bins + {NUM_SPECIALS} special tokens"
        else:
            classes = self._official_class_tokens(ids)
            specials = (PAD, OFFICIAL_PROMPT, OFFICIAL_NOISE)
            coord_start = OFFICIAL_COORD_SHIFT
            need = max(OFFICIAL_VOCAB_SIZE, coord_start + self.bins)
            holds = f"coordinates {coord_start}..{coord_start + self.bins - 1} ({self.bins} bins)"
        if self.vocab_size == 0:
            object.__setattr__(self, "vocab_size", need)
        elif self.vocab_size < coord_start + self.bins:
            raise ConfigError(
                f"tokenizer.vocab_size: {self.vocab_size} cannot hold {holds} (needs {coord_start + self.bins})"
            )
        object.__setattr__(self, "pad", specials[0])
        object.__setattr__(self, "eos", specials[0])
        object.__setattr__(self, "prompt", specials[1])
        object.__setattr__(self, "noise", specials[2])
        object.__setattr__(self, "class_token_ids", classes)
        object.__setattr__(self, "coord_start", coord_start)
        # lookup tables: class token of each label, label of each token (-1: not a class)
        label_of = torch.full((self.vocab_size,), -1, dtype=torch.long)
        label_of[list(classes)] = torch.arange(self.num_classes)
        object.__setattr__(self, "_class_ids", torch.tensor(classes, dtype=torch.long))
        object.__setattr__(self, "_label_of", label_of)
        coords = set(range(coord_start, self.coord_end))
        assert len(set(classes)) == len(classes) and not set(specials) & set(classes)
        assert not coords & set(classes) and not coords & set(specials)
        assert self.coord_end <= self.vocab_size

    def _official_class_tokens(self, ids: tuple[int, ...]) -> tuple[int, ...]:
        if len(ids) != self.num_classes:
            raise ConfigError(
                f"tokenizer.vocab: official needs the {self.num_classes} categories' ids, got {len(ids)}"
            )
        for i in ids:
            _check_official_id(i, f"id {i}")
        if len(set(ids)) != len(ids):
            raise ConfigError("tokenizer.vocab: official: two categories share an id")
        return tuple(OFFICIAL_CLASS_SHIFT + i for i in ids)

    @classmethod
    def for_categories(
        cls, categories: list[dict], bins: int, vocab_size: int = 0, layout: str = "compact"
    ) -> Vocab:
        """The vocabulary of a dataset's category list (``[{"id", "name"}, ...]``, label order).

        The official layout names the offending category when its id has no class token.
        """
        if layout == "official":
            for c in categories:
                _check_official_id(int(c["id"]), f"{c.get('name', '?')!r} (id {c['id']})")
        ids = tuple(int(c["id"]) for c in categories) if layout == "official" else ()
        return cls(len(categories), bins, vocab_size, layout, ids)

    def to_dict(self) -> dict:
        """The constructor's arguments as plain values (stored in checkpoints: ``Vocab(**d)``)."""
        return {
            "num_classes": self.num_classes,
            "bins": self.bins,
            "vocab_size": self.vocab_size,
            "layout": self.layout,
            "category_ids": list(self.category_ids),
        }

    # ranges are half-open [start, end)
    @property
    def coord_end(self) -> int:
        return self.coord_start + self.bins

    def class_tokens(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``class_token_ids`` as a long tensor ``(C,)`` (index the logits with it)."""
        return self._class_ids.to(device)

    # ------------------------------------------------------------------ conversions (tensors)
    def label_to_token(self, labels: torch.Tensor) -> torch.Tensor:
        """Contiguous labels (..., ) in [0, C) -> class tokens."""
        return self._class_ids.to(labels.device)[labels]

    def token_to_label(self, tokens: torch.Tensor) -> torch.Tensor:
        """Class tokens -> contiguous labels (-1 for a token that is not a class)."""
        return self._label_of.to(tokens.device)[tokens.clamp(0, self.vocab_size - 1)]

    def quantize(self, coords01: torch.Tensor) -> torch.Tensor:
        """Coordinates normalised to [0, 1] by the padded canvas -> coordinate tokens (long)."""
        q = torch.round(coords01.clamp(0.0, 1.0) * (self.bins - 1)).long()
        return q.clamp_(0, self.bins - 1) + self.coord_start

    def dequantize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Coordinate tokens -> coordinates in [0, 1] (float)."""
        q = (tokens - self.coord_start).clamp(0, self.bins - 1)
        return q.float() / (self.bins - 1)

    def is_class(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_to_label(tokens) >= 0

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
            m[self.class_tokens(device)] = True
            m[self.noise] = True
        else:
            raise ValueError(f"unknown position kind {kind!r}")
        return m
