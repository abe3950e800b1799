"""Whole-model parity with the official Pix2Seq code (google-research/pix2seq), run locally.

Builds the official ``encoder_ar_decoder`` model from a checkout you supply (``--official-src``),
gives every variable random values (BatchNorm moving statistics and LayerNorm scales included, so
no normalisation is the identity), saves it with ``tf.train.Checkpoint`` (with an optimizer, so the
checkpoint has slots and bookkeeping entries as the released ones do), converts that checkpoint with
``pix2seq weights convert``'s function and runs both models on the same padded images::

    python scripts/official_parity.py --official-src ~/src/pix2seq --arch resnet --size 256 --size 202x170
    python scripts/official_parity.py --official-src ~/src/pix2seq --arch resnet-c --size 256

Reported per size (and written to ``--out`` as JSON): max |diff| of the transformer encoder's output
(after its final LayerNorm), of the decoder's memory (after the bridge), of the teacher-forced
logits over the whole sequence, and whether the greedy tokens (``--tokens`` of them, 500 by default:
100 objects) are identical, with the first position where they differ.

The official code is imported, never copied. Its environment: this project with the ``official``
extra, plus ``tf-keras`` (the official code is written for Keras 2; ``TF_USE_LEGACY_KERAS=1`` is
set here), ``ml-collections`` and ``einops``. ``tensorflow-addons`` (imported by the official ResNet
for options these models do not use, and no longer built for current TensorFlow) is replaced by an
empty stand-in when it is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torchvision  # noqa: F401  - before TensorFlow: both bundle LLVM, the other order aborts

from pix2seq.config import config_from_dict
from pix2seq.decoding import generate
from pix2seq.model import build_model
from pix2seq.vocab import Vocab
from pix2seq.weights.convert import ARCHS, convert_checkpoint

# the official detection fine-tuning model settings (configs/config_det_finetune.py)
OFFICIAL_MODEL = dict(
    name="encoder_ar_decoder",
    max_seq_len=512,
    vocab_size=3000,
    coord_vocab_shift=1000,
    text_vocab_shift=3000,
    use_cls_token=False,
    shared_decoder_embedding=True,
    decoder_output_bias=True,
    patch_size=16,
    drop_path=0.1,
    drop_units=0.1,
    drop_att=0.0,
    dec_proj_mode="mlp",
    pos_encoding="sin_cos",
    pos_encoding_dec="learned",
)
PROMPT = 10


def import_official(src: Path):
    """``(tf, Model class, architecture_config_map)`` from the official checkout ``src``."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf

    try:
        import tensorflow_addons  # noqa: F401
    except ImportError:  # only LAMB and GroupNormalization come from it; neither is used here
        stub = types.ModuleType("tensorflow_addons")
        stub.layers = types.ModuleType("tensorflow_addons.layers")
        stub.optimizers = types.ModuleType("tensorflow_addons.optimizers")
        sys.modules.update({"tensorflow_addons": stub, "tensorflow_addons.layers": stub.layers})
        sys.modules["tensorflow_addons.optimizers"] = stub.optimizers
    sys.path.insert(0, str(src))
    from configs.config_base import architecture_config_map
    from models.ar_model import Model

    return tf, Model, architecture_config_map


def randomise(tf, model, seed: int) -> None:
    """Random values for every variable, scaled so activations stay O(1) through the network:
    kernels N(0, 1/fan_in) (convolutions 2/fan_in), biases and betas N(0, 0.1^2), gammas and
    moving variances U(0.5, 1.5), moving means N(0, 0.1^2), positions N(0, 9), the token embedding
    N(0, 4/d) (logits of std ~2: a spread-out next-token distribution, greedy tokens that vary)."""
    rng = np.random.default_rng(seed)
    for v in model.variables:
        name, shape = v.name, tuple(v.shape)
        if name.endswith(("gamma:0", "moving_variance:0")):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith(("beta:0", "bias:0", "moving_mean:0")):
            value = rng.normal(0.0, 0.1, shape)
        elif "kernel" in name:
            fan_in = int(np.prod(shape[:-1])) if len(shape) == 4 else shape[0]
            if "attention_output" in name:  # Keras MHA output kernel [heads, head_dim, d]
                fan_in = shape[0] * shape[1]
            gain = 2.0 if len(shape) == 4 else 1.0
            value = rng.normal(0.0, np.sqrt(gain / fan_in), shape)
        elif "token_embedding" in name:  # logits = LN(h) @ E^T: std ~2, a spread-out next token
            value = rng.normal(0.0, 2.0 / np.sqrt(shape[1]), shape)
        else:  # learned positions, large: they dominate the decoder's residual stream, so the
            # greedy tokens vary along the sequence instead of settling on one token
            value = rng.normal(0.0, 3.0, shape)
        v.assign(value.astype(np.float32))


def make_images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """``(n, h, w, 3)`` float32 canvases: a smooth random image in the top-left part, 0.3 padding."""
    rng = np.random.default_rng(seed)
    out = np.full((n, h, w, 3), 0.3, np.float32)
    for i in range(n):
        ih, iw = (h, int(w * 0.8)) if i % 2 == 0 else (int(h * 0.7), w)
        yy, xx = np.meshgrid(np.linspace(0, 1, ih), np.linspace(0, 1, iw), indexing="ij")
        img = np.stack([np.sin(6 * yy + c) * np.cos(4 * xx - c) for c in range(3)], -1) * 0.4 + 0.5
        out[i, :ih, :iw] = np.clip(img + rng.normal(0, 0.08, img.shape), 0, 1)
    return out


def compare(args, tf, Model, arch_map, size: tuple[int, int], workdir: Path) -> dict:
    import ml_collections

    h, w = size
    cfg = ml_collections.ConfigDict(
        {"model": {**OFFICIAL_MODEL, **arch_map[args.arch], "image_size": (h, w)}}
    )
    official = Model(cfg)
    images = make_images(args.batch, h, w, args.seed)
    seq_len = args.tokens + 1
    prompt = tf.fill([args.batch, 1], tf.constant(PROMPT, tf.int64))
    official(images, tf.zeros([args.batch, seq_len], tf.int64), training=False)  # creates the variables
    randomise(tf, official, args.seed)

    # a checkpoint as the official trainer writes it: model + optimizer (slots, iterations, betas)
    opt = tf.keras.optimizers.legacy.Adam(1e-4)
    opt.apply_gradients([(tf.zeros_like(v), v) for v in official.trainable_variables])  # zero step
    prefix = tf.train.Checkpoint(model=official, optimizer=opt).write(str(workdir / f"ckpt-{h}x{w}"))

    t0 = time.perf_counter()
    enc_tf = official.encoder(images, training=False).numpy()
    mem_tf = official._encode_images(images, training=False)
    infer = tf.function(lambda m: official.infer(None, prompt, encoded=m, max_seq_len=seq_len, top_k=1))
    tokens_tf, _, _ = infer(mem_tf)
    tokens_tf = tokens_tf.numpy()
    seq = np.concatenate([np.full((args.batch, 1), PROMPT), tokens_tf[:, :-1]], 1)
    logits_tf = official.decoder(tf.constant(seq), mem_tf, training=False).numpy()
    t_tf = time.perf_counter() - t0

    path = convert_checkpoint(prefix, args.arch, max(h, w), workdir / f"model-{h}x{w}.pt")
    f = torch.load(path, map_location="cpu", weights_only=True)
    ours, _ = build_model(config_from_dict(f["config"]), vocab := Vocab(**f["vocab"]))
    ours.load_state_dict(f["model"])
    ours.eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    t0 = time.perf_counter()
    captured = {}
    hook = ours.encoder.register_forward_hook(lambda mod, inp, out: captured.update(enc=out))
    with torch.inference_mode():
        mem = ours.encode(x)
        hook.remove()
        logits = ours.decode(torch.from_numpy(seq), mem)
        gen = generate(ours, None, vocab, args.tokens // 5, method="greedy", constrained=False, memory=mem)
    t_ours = time.perf_counter() - t0
    tokens = gen.tokens.numpy()
    same = tokens == tokens_tf[:, : tokens.shape[1]]
    first = [int(np.argmin(row)) if not row.all() else None for row in same]
    return {
        "size": f"{h}x{w}",
        "feature_grid": [official.encoder.n_rows, official.encoder.n_cols],
        "encoder_max_abs_diff": float(np.abs(captured["enc"].numpy() - enc_tf).max()),
        "encoder_max_abs": float(np.abs(enc_tf).max()),
        "memory_max_abs_diff": float(np.abs(mem.numpy() - mem_tf.numpy()).max()),
        "logits_max_abs_diff": float(np.abs(logits.numpy() - logits_tf).max()),
        "logits_max_abs": float(np.abs(logits_tf).max()),
        "greedy_tokens": int(tokens.shape[1]),
        "greedy_identical": bool(same.all()),
        "first_difference": first,
        "distinct_tokens": int(len(np.unique(tokens_tf))),
        "seconds_official": round(t_tf, 1),
        "seconds_ours": round(t_ours, 1),
    }


def parse_size(s: str) -> tuple[int, int]:
    h, _, w = s.partition("x")
    return int(h), int(w or h)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official-src", type=Path, required=True, help="a checkout of google-research/pix2seq")
    p.add_argument("--arch", choices=sorted(ARCHS), default="resnet")
    p.add_argument("--size", type=parse_size, action="append", help="HxW or S (repeatable; default 256)")
    p.add_argument("--tokens", type=int, default=500, help="greedy tokens to compare (a multiple of 5)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    if not (args.official_src / "models" / "ar_model.py").is_file():
        p.error(f"--official-src: {args.official_src} is not a google-research/pix2seq checkout")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    tf, Model, arch_map = import_official(args.official_src)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.size or [(256, 256)]:
            r = {"arch": args.arch, **compare(args, tf, Model, arch_map, size, Path(tmp))}
            print(json.dumps(r), flush=True)
            results.append(r)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
