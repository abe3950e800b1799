"""``model.init_from``: start a training run from another model's weights (fine-tuning).

    model.init_from: official:resnet_640        # a released checkpoint (downloaded and converted once)
    model.init_from: runs/demo/model.pt         # one of our model files, or a training checkpoint

:func:`load_initial_weights` fills the freshly built network before the optimizer exists:
optimizer, learning-rate schedule, step counters and RNG start afresh (a fine-tune, not a resume;
when ``train.resume`` finds a checkpoint of this run, that checkpoint's weights win). The file
must describe the same network and token layout as the run; anything else is refused before a
step is taken, with the reason in the config's terms (which ``tokenizer.*`` / ``model.*`` values
differ) and the tensors that do not fit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from pix2seq.checkpoint import CheckpointError, load_checkpoint
from pix2seq.config import Config, ConfigError
from pix2seq.errors import Pix2SeqError
from pix2seq.vocab import Vocab
from pix2seq.weights.official import local_model_file

log = logging.getLogger(__name__)

# model.* keys that change no tensor's name or shape (regularisation, kernels, initialisation)
_SHAPE_FREE = {
    "dropout",
    "drop_path",
    "attention",
    "pretrained",
    "coord_init",
    "init_from",
    "pos_temperature",
}
_MAX_LISTED = 4  # tensors named in an error message


class InitFromError(ConfigError):
    """``model.init_from`` names a file whose weights cannot start this run; one line, key first."""


def vocabulary_mismatch(stored: dict[str, Any], vocab: Vocab) -> str | None:
    """Why a file's token layout cannot serve this run's (None when its token ids mean the same).

    Compact layouts must agree on the number of categories (class and coordinate ids follow from it);
    the official layout fixes every id (class = 100 + category id), so any dataset fits.
    """
    here = vocab.to_dict()
    there = {
        "layout": stored.get("layout", "compact"),
        **{k: stored.get(k) for k in ("num_classes", "bins", "vocab_size")},
    }
    if there["layout"] != here["layout"]:
        return (
            f"it uses the {there['layout']} vocabulary ({there['vocab_size']} tokens) and this run the "
            f"{here['layout']} one; set tokenizer.vocab: {there['layout']}"
        )
    if there["bins"] != here["bins"]:
        return f"it was trained with tokenizer.bins={there['bins']}, this run has {here['bins']}"
    if here["layout"] == "compact" and there["num_classes"] != here["num_classes"]:
        return (
            f"it was trained on {there['num_classes']} categories and this dataset has {here['num_classes']}: "
            "with tokenizer.vocab: compact the class and coordinate token ids follow from that number, "
            "so they would mean other things (use tokenizer.vocab: official, or train from scratch)"
        )
    if there["vocab_size"] != here["vocab_size"]:
        return f"it has {there['vocab_size']} tokens (tokenizer.vocab_size), this run {here['vocab_size']}"
    return None


def _architecture_differences(stored_cfg: dict[str, Any], cfg: Config) -> list[str]:
    """``model.*`` values that differ between the file's config and this run (shape-free keys aside)."""
    stored = stored_cfg.get("model", {}) if isinstance(stored_cfg, dict) else {}
    here = cfg.to_dict()["model"]
    keys = [k for k in here if k not in _SHAPE_FREE and k in stored and stored[k] != here[k]]
    return [f"model.{k}: file {stored[k]!r}, this run {here[k]!r}" for k in keys]


def _is_bn_counter(name: str) -> bool:
    """BatchNorm's step counter: absent from frozen BN and GroupNorm, never used by either."""
    return name.endswith("num_batches_tracked")


def tensor_mismatches(model: nn.Module, state: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, misshaped) tensor names of ``state`` against ``model``; misshaped ones
    carry both shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not _is_bn_counter(k)]
    unexpected = [k for k in state if k not in own and not _is_bn_counter(k)]
    misshaped = [
        f"{k} (file {list(state[k].shape)}, here {list(own[k].shape)})"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    return missing, unexpected, misshaped


def _listed(kind: str, names: list[str]) -> str:
    more = f", ... {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"{len(names)} {kind} ({', '.join(names[:_MAX_LISTED])}{more})"


def load_initial_weights(model: nn.Module, cfg: Config, vocab: Vocab, categories: list[dict]) -> str:
    """Fill ``model`` (built for ``cfg``/``vocab``, not yet wrapped or compiled) with the weights
    ``cfg.model.init_from`` names; returns a one-line summary. Raises :class:`InitFromError`."""
    spec = cfg.model.init_from
    try:
        path = local_model_file(spec)
    except Pix2SeqError as e:  # unknown name, download or conversion failure
        raise InitFromError(f"model.init_from: {spec}: {e}") from None
    where = f"model.init_from: {spec}" + (f" ({path})" if str(path) != spec else "")
    if not Path(path).is_file():
        raise InitFromError(f"{where}: no such file")
    try:
        ckpt = load_checkpoint(path, map_location="cpu")
    except CheckpointError as e:
        raise InitFromError(f"{where}: {e}") from None
    if not isinstance(ckpt.get("model"), dict) or "vocab" not in ckpt:
        raise InitFromError(
            f"{where}: not a pix2seq model file or checkpoint (no 'model' and 'vocab' entries)"
        )
    why = vocabulary_mismatch(dict(ckpt["vocab"]), vocab)
    if why:
        raise InitFromError(f"{where}: {why}")
    state = ckpt["model"]
    missing, unexpected, misshaped = tensor_mismatches(model, state)
    if missing or unexpected or misshaped:
        parts = [_listed(kind, names) for kind, names in
                 (("misshaped", misshaped), ("missing from the file", missing), ("not in this network", unexpected))
                 if names]  # fmt: skip
        diff = _architecture_differences(ckpt.get("config", {}), cfg)
        hint = f"; the configs differ in {', '.join(diff)}" if diff else ""
        raise InitFromError(f"{where}: its network does not fit this run's: {'; '.join(parts)}{hint}")
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)  # BN counters aside
    stored_names = [str(c.get("name")) for c in ckpt.get("categories", [])]
    names = [str(c.get("name")) for c in categories]
    if stored_names and stored_names != names and vocab.layout == "compact":
        log.warning(
            "%s: its categories %s are not this dataset's %s; label i continues label i",
            where,
            stored_names,
            names,
        )
    return f"{where}: {len(state)} tensors loaded (fresh optimizer and schedule)"
