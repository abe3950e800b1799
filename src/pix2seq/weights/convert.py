"""Official Pix2Seq TensorFlow checkpoints -> this project's model file.

::

    path = convert_checkpoint("coco_det_finetune/resnet_640x640/ckpt-74844", "resnet", 640, "model.pt")

The official code saves ``tf.train.Checkpoint(model=..., optimizer=...)``: every tensor key is the
Python attribute path of a variable followed by ``/.ATTRIBUTES/VARIABLE_VALUE``
(``model/encoder/stem_projection/kernel/.ATTRIBUTES/VARIABLE_VALUE``; a ``/`` inside a variable's own
name is written ``.S``), optimizer slots add ``/.OPTIMIZER_SLOT/optimizer/{m,v}``. Every ``model/``
tensor is mapped onto :class:`pix2seq.model.Pix2Seq` built with the official switches
(:func:`official_config`); optimizer slots and the bookkeeping entries (``optimizer/*``,
``global_step``, ``save_counter``, the object graph) are skipped. A tensor the model needs and the
checkpoint lacks, a checkpoint tensor nothing reads, or a shape that does not fit fails the
conversion with a message that names them.

Layouts: dense kernels are ``[in, out]`` (PyTorch ``weight = kernel.T``), convolution kernels HWIO
(-> OIHW), Keras multi-head attention kernels ``[d, heads, d/heads]`` for query/key/value and
``[heads, d/heads, d]`` for the output (head-major, as PyTorch's fused projections), BatchNorm
``gamma, beta, moving_mean, moving_variance`` -> ``weight, bias, running_mean, running_var``.

The file written is the slim ``model.pt`` format (:func:`pix2seq.serving.export_model_file`):
``{"model": state dict, "config", "vocab", "categories"}`` plus ``global_step`` and
``converted_from``; its categories are COCO 2017's 80 and its vocabulary the official layout
(class token 100 + COCO id). ``pix2seq predict --model``, ``eval.checkpoint`` and serving read it.

Reading TensorFlow checkpoints needs the ``official`` extra (``tensorflow-cpu``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pix2seq.checkpoint import save_checkpoint
from pix2seq.config import Config, config_from_dict
from pix2seq.data.coco_categories import coco_categories
from pix2seq.errors import Pix2SeqError
from pix2seq.model import build_model  # loads torchvision, which must come before TensorFlow (below)
from pix2seq.vocab import OFFICIAL_VOCAB_SIZE, Vocab

Arch = Literal["resnet", "resnet-c"]

# google-research/pix2seq configs/config_base.py architecture_config_map (both are ResNet-50)
ARCHS: dict[str, dict[str, Any]] = {
    "resnet": dict(backbone_stage="layer4", d_model=256, encoder_layers=6, decoder_layers=6, heads=8, mlp_dim=1024),
    "resnet-c": dict(backbone_stage="layer3", d_model=512, encoder_layers=12, decoder_layers=8, heads=16, mlp_dim=2048),
}  # fmt: skip
RESNET50_BLOCKS = (3, 4, 6, 3)
OFFICIAL_MAX_SEQ_LEN = 512
OFFICIAL_BINS = 1000
OFFICIAL_MAX_INSTANCES = 100

SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_BOOKKEEPING = ("_CHECKPOINTABLE_OBJECT_GRAPH", "global_step" + SUFFIX, "save_counter" + SUFFIX)
EXTRA_HINT = "uv sync --extra official (or pip install 'stable-pix2seq[official]')"


class ConversionError(Pix2SeqError, ValueError):
    """The checkpoint cannot be converted; the message names the file or the tensors."""


# ----------------------------------------------------------------------------------- the config


def official_config(arch: Arch, image_size: int, max_seq_len: int = OFFICIAL_MAX_SEQ_LEN) -> Config:
    """The config of a converted model: the architecture ``arch`` with every official switch
    (raw [0, 1] pixels padded with 0.3, SAME max-pool, LayerNorm eps 1e-6, normalised positions,
    ``max_seq_len`` learned positions, the official vocabulary), at ``image_size`` pixels."""
    if arch not in ARCHS:
        raise ConversionError(f"--arch: must be one of {sorted(ARCHS)}, got {arch!r}")
    if image_size < 32:
        raise ConversionError(f"--image-size: must be >= 32, got {image_size}")
    model = dict(
        backbone="resnet50",
        pretrained=False,
        backbone_norm="auto",
        dropout=0.1,  # the official drop_units and drop_path (fine-tuning from these weights)
        drop_path=0.1,
        pixels="official",
        stem_pool="same",
        ln_eps=1e-6,
        pos_normalize=True,
        max_seq_len=max_seq_len,
        **ARCHS[arch],
    )
    return config_from_dict(
        {
            "data": {
                "source": "coco",
                "root": "data/coco",
                "prepared_dir": "data/coco-prepared",
                "image_size": image_size,
            },
            "tokenizer": {
                "bins": OFFICIAL_BINS,
                "max_instances": OFFICIAL_MAX_INSTANCES,
                "vocab": "official",
                "vocab_size": OFFICIAL_VOCAB_SIZE,
            },
            "model": model,
        }
    )


# ------------------------------------------------------------------------------ the tensor map


@dataclass(frozen=True)
class _Kind:
    """How one checkpoint tensor becomes (a slice of) one PyTorch tensor."""

    tf_shape: Callable[[tuple[int, ...], int], tuple[int, ...]]  # (our slice shape, heads) -> TF shape
    to_torch: Callable[[np.ndarray, int], np.ndarray]  # (TF array, heads) -> our slice


_KINDS = {
    "same": _Kind(lambda s, h: s, lambda a, h: a),
    "conv": _Kind(lambda s, h: (s[2], s[3], s[1], s[0]), lambda a, h: a.transpose(3, 2, 0, 1)),
    "dense": _Kind(lambda s, h: (s[1], s[0]), lambda a, h: a.T),
    # Keras MultiHeadAttention: query/key/value kernels [d, H, d/H], biases [H, d/H]; output [H, d/H, d]
    "heads_in": _Kind(lambda s, h: (s[1], h, s[0] // h), lambda a, h: a.reshape(a.shape[0], -1).T),
    "heads_bias": _Kind(lambda s, h: (h, s[0] // h), lambda a, h: a.reshape(-1)),
    "heads_out": _Kind(lambda s, h: (h, s[1] // h, s[0]), lambda a, h: a.reshape(-1, a.shape[-1]).T),
}


@dataclass(frozen=True)
class _Entry:
    ours: str  # state-dict key
    tf: tuple[str, ...]  # checkpoint names (without "model/" and the suffix); several: concatenated
    kind: str


def _dense(ours: str, tf: str) -> list[_Entry]:
    return [
        _Entry(f"{ours}.weight", (f"{tf}/kernel",), "dense"),
        _Entry(f"{ours}.bias", (f"{tf}/bias",), "same"),
    ]


def _norm(ours: str, tf: str) -> list[_Entry]:
    return [
        _Entry(f"{ours}.weight", (f"{tf}/gamma",), "same"),
        _Entry(f"{ours}.bias", (f"{tf}/beta",), "same"),
    ]


def _batchnorm(ours: str, tf: str) -> list[_Entry]:
    names = (
        ("weight", "gamma"),
        ("bias", "beta"),
        ("running_mean", "moving_mean"),
        ("running_var", "moving_variance"),
    )
    return [_Entry(f"{ours}.{a}", (f"{tf}/bn/{b}",), "same") for a, b in names]


def _mha(ours_in: str, ours_out: str, tf: str, parts: tuple[str, ...]) -> list[_Entry]:
    """Keras MHA ``tf`` -> a fused input projection ``ours_in`` (the ``parts`` concatenated) and ``ours_out``."""
    dense = tuple(f"{tf}/_{p}_dense" for p in parts)
    return [
        _Entry(f"{ours_in}.weight", tuple(f"{t}/kernel" for t in dense), "heads_in"),
        _Entry(f"{ours_in}.bias", tuple(f"{t}/bias" for t in dense), "heads_bias"),
        _Entry(f"{ours_out}.weight", (f"{tf}/_output_dense/kernel",), "heads_out"),
        _Entry(f"{ours_out}.bias", (f"{tf}/_output_dense/bias",), "same"),
    ]


def _mlp(ours_norm: str, ours_mlp: str, tf: str) -> list[_Entry]:
    """The official residual ``MLP`` block: its LayerNorm and its one feed-forward layer."""
    return [
        *_norm(ours_norm, f"{tf}/layernorms/0"),
        *_dense(f"{ours_mlp}.fc1", f"{tf}/mlp_layers/0/dense1"),
        *_dense(f"{ours_mlp}.fc2", f"{tf}/mlp_layers/0/dense2"),
    ]


def _resnet(stage: str) -> list[_Entry]:
    """torchvision's ResNet-50 up to ``stage`` <- the official ``resnet`` (block_groups 0..3)."""
    tf = "encoder/resnet"
    out = [
        _Entry("backbone.body.conv1.weight", (f"{tf}/initial_conv_relu_max_pool/0/conv2d/kernel",), "conv"),
        *_batchnorm("backbone.body.bn1", f"{tf}/initial_conv_relu_max_pool/2"),
    ]
    groups = int(stage[-1])  # layer3: 3 groups (C4), layer4: 4 (C5)
    for g, blocks in enumerate(RESNET50_BLOCKS[:groups]):
        for b in range(blocks):
            ours, t = f"backbone.body.layer{g + 1}.{b}", f"{tf}/block_groups/{g}/layers/{b}"
            for i, (conv, bn) in enumerate(((0, 1), (3, 4), (6, 7)), start=1):
                layers = f"{t}/conv_relu_dropblock_layers"
                out.append(_Entry(f"{ours}.conv{i}.weight", (f"{layers}/{conv}/conv2d/kernel",), "conv"))
                out += _batchnorm(f"{ours}.bn{i}", f"{layers}/{bn}")
            if b == 0:
                out.append(
                    _Entry(f"{ours}.downsample.0.weight", (f"{t}/projection_layers/0/conv2d/kernel",), "conv")
                )
                out += _batchnorm(f"{ours}.downsample.1", f"{t}/projection_layers/1")
    return out


def official_tensor_map(cfg: Config) -> list[_Entry]:
    """Every state-dict entry of the official-switch model of ``cfg`` and the checkpoint tensors
    it is made of (names without ``model/`` and the ``/.ATTRIBUTES/VARIABLE_VALUE`` suffix)."""
    m = cfg.model
    out = _resnet(m.backbone_stage)
    out += _dense("input_proj", "encoder/stem_projection") + _norm("input_norm", "encoder/stem_ln")
    for i in range(m.encoder_layers):
        ours, tf = f"encoder.layers.{i}", f"encoder/transformer_encoder/enc_layers/{i}"
        out += _norm(f"{ours}.norm1", f"{tf}/mha_ln")
        out += _mha(f"{ours}.attn.qkv", f"{ours}.attn.proj", f"{tf}/mha", ("query", "key", "value"))
        out += _mlp(f"{ours}.norm2", f"{ours}.mlp", f"{tf}/mlp")
    out += _norm("encoder.norm", "encoder/output_ln")
    out += _dense("bridge_proj", "proj") + _norm("bridge_norm", "proj_ln")
    out += _mlp("bridge_mlp_norm", "bridge_mlp", "proj_mlp")
    out += [
        _Entry("token_embed.weight", ("decoder/ar_decoder.Stoken_embedding",), "same"),
        _Entry("pos_embed", ("decoder/ar_decoder.Sseq_pos_embedding",), "same"),
        _Entry("out_bias", ("decoder/ar_decoder.Soutp_bias",), "same"),
    ]
    for i in range(m.decoder_layers):
        ours, tf = f"decoder.layers.{i}", f"decoder/decoder/dec_layers/{i}"
        out += _norm(f"{ours}.norm1", f"{tf}/self_ln")
        out += _mha(
            f"{ours}.self_attn.qkv", f"{ours}.self_attn.proj", f"{tf}/self_mha", ("query", "key", "value")
        )
        out += _norm(f"{ours}.norm2", f"{tf}/cross_ln")
        out += _mha(f"{ours}.cross_attn.q", f"{ours}.cross_attn.proj", f"{tf}/cross_mha", ("query",))
        out.append(_Entry(f"{ours}.cross_attn.kv.weight", (f"{tf}/cross_mha/_key_dense/kernel", f"{tf}/cross_mha/_value_dense/kernel"), "heads_in"))  # fmt: skip
        out.append(_Entry(f"{ours}.cross_attn.kv.bias", (f"{tf}/cross_mha/_key_dense/bias", f"{tf}/cross_mha/_value_dense/bias"), "heads_bias"))  # fmt: skip
        out += _mlp(f"{ours}.norm3", f"{ours}.mlp", f"{tf}/mlp")
    out += _norm("decoder.norm", "decoder/output_ln")
    return out


# ------------------------------------------------------------------------------------ reading


def _tf_name(name: str) -> str:
    return f"model/{name}{SUFFIX}"


def read_tf_checkpoint(prefix: str | Path) -> tuple[dict[str, np.ndarray], int | None]:
    """``(model tensors, global_step)`` of a TensorFlow checkpoint (a prefix such as
    ``dir/ckpt-74844``, or a directory holding a ``checkpoint`` index file).

    Optimizer slots and bookkeeping entries are skipped; any other entry is returned, so the caller
    can name the ones it does not use.
    """
    # TensorFlow is imported only here, after torchvision (this module's imports): both bundle LLVM,
    # and torchvision loaded second aborts the process ("option registered more than once")
    try:
        import tensorflow as tf
    except ImportError:
        raise ConversionError(
            f"reading TensorFlow checkpoints needs the 'official' extra: {EXTRA_HINT}"
        ) from None
    try:
        reader = tf.train.load_checkpoint(str(prefix))
        shapes = reader.get_variable_to_shape_map()
    except (ValueError, tf.errors.OpError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConversionError(f"{prefix}: not a readable TensorFlow checkpoint ({first})") from None
    tensors = {}
    for name in shapes:
        if name in _BOOKKEEPING or "/.OPTIMIZER_SLOT/" in name or name.startswith("optimizer/"):
            continue
        tensors[name] = np.asarray(reader.get_tensor(name))
    step = reader.get_tensor("global_step" + SUFFIX) if "global_step" + SUFFIX in shapes else None
    return tensors, None if step is None else int(step)


# -------------------------------------------------------------------------------- conversion


def _listing(what: str, names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return f"{len(names)} {what}: {shown}"


def map_tensors(
    tensors: dict[str, np.ndarray], cfg: Config, target: dict[str, torch.Tensor], heads: int
) -> dict[str, torch.Tensor]:
    """The state dict ``target`` (our keys and shapes) filled from the checkpoint ``tensors``.

    Raises :class:`ConversionError` naming every missing, misshaped and unused tensor.
    """
    missing, misshaped, out = [], [], {}
    used: set[str] = set()
    for e in official_tensor_map(cfg):
        kind = _KINDS[e.kind]
        want = tuple(target[e.ours].shape)
        part = (want[0] // len(e.tf), *want[1:])  # fused projections: equal row blocks
        pieces = []
        for name in e.tf:
            key = _tf_name(name)
            if key not in tensors:
                missing.append(key)
                continue
            used.add(key)
            a = tensors[key]
            expect = kind.tf_shape(part, heads)
            if tuple(a.shape) != tuple(expect):
                misshaped.append(f"{key} is {list(a.shape)}, {e.ours} needs {list(expect)}")
                continue
            pieces.append(kind.to_torch(a, heads))
        if len(pieces) == len(e.tf):
            value = np.concatenate(pieces, axis=0) if len(pieces) > 1 else pieces[0]
            out[e.ours] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    unused = sorted(set(tensors) - used)
    problems = [
        _listing(what, names) for what, names in (("missing", missing), ("misshaped", misshaped), ("unused", unused))
        if names
    ]  # fmt: skip
    if problems:
        raise ConversionError("; ".join(problems))
    unfilled = [k for k in target if k not in out and not k.endswith("num_batches_tracked")]
    assert not unfilled, f"the tensor map leaves {unfilled} unfilled"
    return out


def convert_checkpoint(prefix: str | Path, arch: Arch, image_size: int, out: str | Path) -> Path:
    """Convert the official checkpoint ``prefix`` of architecture ``arch`` into a model file at
    ``out`` (the slim ``model.pt`` format) for ``image_size``-pixel inputs; returns its path."""
    tensors, step = read_tf_checkpoint(prefix)
    pos = tensors.get(_tf_name("decoder/ar_decoder.Sseq_pos_embedding"))
    seq_len = int(pos.shape[0]) if pos is not None and pos.ndim == 2 else OFFICIAL_MAX_SEQ_LEN
    cfg = official_config(arch, image_size, max(seq_len, 5 * OFFICIAL_MAX_INSTANCES + 1))
    categories = coco_categories()
    t = cfg.tokenizer
    vocab = Vocab.for_categories(categories, t.bins, t.vocab_size, t.vocab)
    with torch.device("meta"):  # keys and shapes only: no memory, no random initialisation
        model, _ = build_model(cfg, vocab)
    target = model.state_dict()
    try:
        state = map_tensors(tensors, cfg, target, cfg.model.heads)
    except ConversionError as e:
        raise ConversionError(f"{prefix} (--arch {arch}): {e}") from None
    for k in target:  # BatchNorm's step counters: not in the checkpoint, unused at momentum 0.1
        if k.endswith("num_batches_tracked"):
            state[k] = torch.zeros((), dtype=torch.long)
    model.load_state_dict(state, assign=True)  # strict: every key, every shape
    payload = {
        "model": {k: state[k] for k in target},
        "config": cfg.to_dict(),
        "vocab": vocab.to_dict(),
        "categories": categories,
        "global_step": step or 0,
        "converted_from": {"checkpoint": str(prefix), "arch": arch},
    }
    return save_checkpoint(out, payload)


__all__ = [
    "ARCHS",
    "ConversionError",
    "convert_checkpoint",
    "map_tensors",
    "official_config",
    "official_tensor_map",
    "read_tf_checkpoint",
]
