"""The Pix2Seq model: backbone, transformer, loss and :func:`build_model`."""

from __future__ import annotations

from pix2seq.config import Config
from pix2seq.model.backbone import Backbone
from pix2seq.model.loss import SequenceLoss
from pix2seq.model.pix2seq import Pix2Seq
from pix2seq.model.transformer import StepCache
from pix2seq.vocab import Vocab


def max_seq_len(cfg: Config) -> int:
    """Decoder positions: ``model.max_seq_len``, else the prompt + 5 tokens per instance."""
    return cfg.model.max_seq_len or 5 * cfg.tokenizer.max_instances + 1


def build_model(cfg: Config, vocab: Vocab) -> tuple[Pix2Seq, SequenceLoss]:
    """``(model, criterion)`` for ``cfg.model`` over ``vocab``'s token ids."""
    coord_tokens = (vocab.coord_start, vocab.coord_end)
    model = Pix2Seq(cfg.model, vocab.vocab_size, max_seq_len(cfg), coord_tokens=coord_tokens)
    return model, SequenceLoss(coord_sigma=cfg.tokenizer.coord_sigma, coord_tokens=coord_tokens)


__all__ = ["Backbone", "Pix2Seq", "SequenceLoss", "StepCache", "build_model", "max_seq_len"]
