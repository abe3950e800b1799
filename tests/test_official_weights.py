"""The official Pix2Seq checkpoints: conversion (pix2seq.weights.convert) and the official-switch
model's layers against TensorFlow's own (Keras) layers with the mapped weights.

The checkpoints here are written by the tests: ``tf.train.Checkpoint`` over nested trackables whose
attribute paths and shapes are the official code's (listed by :func:`official_variables`, written
from the official architecture, independently of the converter's map). TensorFlow comes from the
``official`` extra (``make test`` installs it) and is imported once for the module.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pix2seq.checkpoint import load_checkpoint
from pix2seq.config import config_from_dict
from pix2seq.data.transforms import OFFICIAL_PAD_VALUE, EvalTransform
from pix2seq.model import build_model
from pix2seq.model.backbone import Backbone, SameMaxPool2d
from pix2seq.model.transformer import CrossAttention, SelfAttention
from pix2seq.vocab import Vocab
from pix2seq.weights.convert import (
    ARCHS,
    SUFFIX,
    ConversionError,
    convert_checkpoint,
    map_tensors,
    official_config,
    read_tf_checkpoint,
)

tf = pytest.importorskip("tensorflow", reason="needs the 'official' extra (uv sync --extra official)")
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning"
)
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------- the official variables (oracle)


def official_variables(arch: str) -> dict[str, tuple[int, ...]]:
    """Every model variable of the official ``arch`` (google-research/pix2seq, ResNet-50 variants):
    ``{attribute path: shape}``, paths relative to ``model/`` with ``/`` in own names kept."""
    d, mlp, enc, dec, heads = {
        "resnet": (256, 1024, 6, 6, 8),
        "resnet-c": (512, 2048, 12, 8, 16),
    }[arch]
    groups = 4 if arch == "resnet" else 3
    dh = d // heads
    v: dict[str, tuple[int, ...]] = {}

    def bn(path: str, c: int) -> None:
        for n in ("gamma", "beta", "moving_mean", "moving_variance"):
            v[f"{path}/bn/{n}"] = (c,)

    def ln(path: str) -> None:
        v[f"{path}/gamma"] = v[f"{path}/beta"] = (d,)

    def dense(path: str, i: int, o: int) -> None:
        v[f"{path}/kernel"], v[f"{path}/bias"] = (i, o), (o,)

    def mlp_block(path: str) -> None:
        ln(f"{path}/layernorms/0")
        dense(f"{path}/mlp_layers/0/dense1", d, mlp)
        dense(f"{path}/mlp_layers/0/dense2", mlp, d)

    def mha(path: str) -> None:
        for p in ("query", "key", "value"):
            v[f"{path}/_{p}_dense/kernel"], v[f"{path}/_{p}_dense/bias"] = (d, heads, dh), (heads, dh)
        v[f"{path}/_output_dense/kernel"], v[f"{path}/_output_dense/bias"] = (heads, dh, d), (d,)

    r = "encoder/resnet"
    v[f"{r}/initial_conv_relu_max_pool/0/conv2d/kernel"] = (7, 7, 3, 64)
    bn(f"{r}/initial_conv_relu_max_pool/2", 64)
    cin = 64
    for g, (blocks, f) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        if g >= groups:
            break
        for b in range(blocks):
            p = f"{r}/block_groups/{g}/layers/{b}"
            for idx, (k, i, o) in zip((0, 3, 6), ((1, cin, f), (3, f, f), (1, f, 4 * f)), strict=True):
                v[f"{p}/conv_relu_dropblock_layers/{idx}/conv2d/kernel"] = (k, k, i, o)
                bn(f"{p}/conv_relu_dropblock_layers/{idx + 1}", o)
            if b == 0:
                v[f"{p}/projection_layers/0/conv2d/kernel"] = (1, 1, cin, 4 * f)
                bn(f"{p}/projection_layers/1", 4 * f)
            cin = 4 * f
    dense("encoder/stem_projection", cin, d)
    ln("encoder/stem_ln")
    for i in range(enc):
        p = f"encoder/transformer_encoder/enc_layers/{i}"
        ln(f"{p}/mha_ln")
        mha(f"{p}/mha")
        mlp_block(f"{p}/mlp")
    ln("encoder/output_ln")
    dense("proj", d, d)
    ln("proj_ln")
    mlp_block("proj_mlp")
    v["decoder/ar_decoder/token_embedding"] = (3000, d)
    v["decoder/ar_decoder/seq_pos_embedding"] = (512, d)
    v["decoder/ar_decoder/outp_bias"] = (3000,)
    for i in range(dec):
        p = f"decoder/decoder/dec_layers/{i}"
        ln(f"{p}/self_ln")
        mha(f"{p}/self_mha")
        ln(f"{p}/cross_ln")
        mha(f"{p}/cross_mha")
        mlp_block(f"{p}/mlp")
    ln("decoder/output_ln")
    return v


def _key(path: str) -> str:
    """Attribute path -> checkpoint key: a ``/`` inside an own name (``ar_decoder/...``) is ``.S``."""
    return "model/" + path.replace("ar_decoder/", "ar_decoder.S") + SUFFIX


def write_checkpoint(prefix, variables: dict[str, np.ndarray]) -> str:
    """``tf.train.Checkpoint`` of nested modules whose attribute paths are ``variables``' keys, plus
    the bookkeeping entries of an official training checkpoint; returns the checkpoint prefix."""

    class Node(tf.Module):
        pass

    root = Node()
    for path, value in variables.items():
        parts = path.split("/")
        if "ar_decoder" in parts:  # `ar_decoder/x`: one own name with a slash
            i = parts.index("ar_decoder")
            parts[i : i + 2] = [f"ar_decoder/{parts[i + 1]}"]
        node = root
        for p in parts[:-1]:
            if not hasattr(node, p):
                setattr(node, p, Node())
            node = getattr(node, p)
        setattr(node, parts[-1], tf.Variable(value))
    opt = Node()
    opt.beta_1, opt.beta_2, opt.decay = tf.Variable(0.9), tf.Variable(0.95), tf.Variable(0.0)
    ckpt = tf.train.Checkpoint(model=root, optimizer=opt, global_step=tf.Variable(1234, dtype=tf.int64))
    return ckpt.write(str(prefix))


def random_values(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for k, s in shapes.items():
        lo, hi = (0.5, 1.5) if k.endswith("moving_variance") else (-0.1, 0.1)
        out[k] = lo + (hi - lo) * rng.random(s, dtype=np.float32)
    return out


# ------------------------------------------------------------------------------- conversion


def _moments(arrays) -> list[float]:
    """Sums of x, x^2 and x^3 over all the arrays' elements (float64): equal for a rearrangement."""
    out = np.zeros(3)
    for a in arrays:
        a = np.asarray(a, dtype=np.float64).ravel()
        out += [a.sum(), a @ a, (a * a) @ a]
    return out.tolist()


@pytest.mark.parametrize("arch", ["resnet", "resnet-c"])
def test_convert_consumes_every_tensor_and_fills_every_parameter(tmp_path, arch):
    values = random_values(official_variables(arch))
    prefix = write_checkpoint(tmp_path / "ckpt", values)
    path = convert_checkpoint(prefix, arch, 64, tmp_path / "model.pt")

    f = load_checkpoint(path, map_location="cpu")
    assert set(f) >= {"model", "config", "vocab", "categories"} and f["global_step"] == 1234
    cfg = config_from_dict(f["config"])
    vocab = Vocab(**f["vocab"])
    assert (cfg.data.image_size, cfg.model.d_model, cfg.model.max_seq_len) == (
        64,
        ARCHS[arch]["d_model"],
        512,
    )
    assert len(f["categories"]) == 80 and vocab.class_token_ids[0] == 101 and vocab.vocab_size == 3000
    sd = {k: t for k, t in f["model"].items() if not k.endswith("num_batches_tracked")}
    # every checkpoint value landed exactly once and nothing else is there: the state dict is a
    # rearrangement of the checkpoint (same element count, same sum, sum of squares and of cubes)
    assert sum(a.size for a in values.values()) == sum(t.numel() for t in sd.values())
    want = _moments(values.values())
    assert _moments(t.numpy() for t in sd.values()) == pytest.approx(want, rel=1e-9)
    # spot checks of each layout: HWIO conv, BN statistics, fused q/k/v, heads-major output, embeddings
    r = "encoder/resnet"
    k7 = torch.from_numpy(values[f"{r}/initial_conv_relu_max_pool/0/conv2d/kernel"])
    assert torch.equal(sd["backbone.body.conv1.weight"], k7.permute(3, 2, 0, 1))
    var = values[f"{r}/block_groups/1/layers/2/conv_relu_dropblock_layers/4/bn/moving_variance"]
    assert torch.equal(sd["backbone.body.layer2.2.bn2.running_var"], torch.from_numpy(var))
    d, h = cfg.model.d_model, cfg.model.heads
    enc = "encoder/transformer_encoder/enc_layers/1/mha"
    qkv = sd["encoder.layers.1.attn.qkv.weight"]
    for i, p in enumerate(("query", "key", "value")):
        kernel = torch.from_numpy(values[f"{enc}/_{p}_dense/kernel"])  # (d, H, dh)
        assert torch.equal(qkv[i * d : (i + 1) * d], kernel.reshape(d, d).T)
    cross = "decoder/decoder/dec_layers/0/cross_mha"
    vb = torch.from_numpy(values[f"{cross}/_value_dense/bias"]).reshape(-1)
    assert torch.equal(sd["decoder.layers.0.cross_attn.kv.bias"][d:], vb)
    out_k = torch.from_numpy(values[f"{cross}/_output_dense/kernel"])  # (H, dh, d)
    assert torch.equal(sd["decoder.layers.0.cross_attn.proj.weight"], out_k.reshape(d, d).T)
    assert out_k.shape[0] == h
    emb = torch.from_numpy(values["decoder/ar_decoder/token_embedding"])
    assert torch.equal(sd["token_embed.weight"], emb)
    # the model file is what predict / evaluate / serving load: strict load, and it runs
    model, _ = build_model(cfg, vocab)
    model.load_state_dict(f["model"])
    model.eval()
    with torch.no_grad():
        logits = model(torch.full((1, 3, 64, 64), OFFICIAL_PAD_VALUE), torch.tensor([[vocab.prompt]]))
    assert logits.shape == (1, 1, 3000) and torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def resnet_tensors(tmp_path_factory):
    """The ``resnet`` architecture's model tensors as :func:`read_tf_checkpoint` returns them."""
    prefix = write_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "ckpt", random_values(official_variables("resnet"))
    )
    tensors, step = read_tf_checkpoint(prefix)
    assert step == 1234 and all(k.startswith("model/") for k in tensors)  # bookkeeping skipped
    return tensors


def _target(cfg):
    """The state dict's keys and shapes (meta tensors) of the official-switch model of ``cfg``."""
    with torch.device("meta"):
        model, _ = build_model(
            cfg, Vocab.for_categories([{"id": i} for i in range(1, 81)], 1000, 3000, "official")
        )
    return model.state_dict()


def test_missing_extra_and_misshaped_tensors_are_named(resnet_tensors):
    cfg = official_config("resnet", 64)
    target = _target(cfg)
    map_tensors(resnet_tensors, cfg, target, cfg.model.heads)  # complete: no error
    broken = dict(resnet_tensors)
    gone = _key("encoder/transformer_encoder/enc_layers/3/mha/_key_dense/bias")
    del broken[gone]
    extra = _key("encoder/cls_token_embedding")
    broken[extra] = np.zeros((1, 256), np.float32)
    odd = _key("proj/kernel")
    broken[odd] = np.zeros((256, 128), np.float32)
    with pytest.raises(ConversionError) as e:
        map_tensors(broken, cfg, target, cfg.model.heads)
    msg = str(e.value)
    assert f"1 missing: {gone}" in msg
    assert f"1 misshaped: {odd} is [256, 128], bridge_proj.weight needs [256, 256]" in msg
    assert f"1 unused: {extra}" in msg and "\n" not in msg


def test_wrong_architecture_and_bad_files_fail_with_one_line(resnet_tensors, tmp_path):
    cfg = official_config("resnet-c", 64)
    with pytest.raises(ConversionError, match=r"missing: .*; \d+ misshaped: .*; \d+ unused: "):
        map_tensors(resnet_tensors, cfg, _target(cfg), cfg.model.heads)
    with pytest.raises(ConversionError, match="not a readable TensorFlow checkpoint"):
        convert_checkpoint(tmp_path / "nothing", "resnet", 64, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_the_cli_converts_and_predict_reads_the_file(tmp_path, capsys):
    import json

    from torchvision.io import write_png

    from pix2seq.cli import main

    prefix = write_checkpoint(tmp_path / "ckpt", random_values(official_variables("resnet")))
    out = tmp_path / "official.pt"
    args = ["weights", "convert", prefix, "--arch", "resnet", "--image-size", "96", "--out", str(out)]
    assert main(args) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    # pix2seq predict on the converted file: the official pixels, vocabulary and COCO categories
    write_png(torch.randint(0, 256, (3, 50, 80), dtype=torch.uint8), str(tmp_path / "a.png"))
    args = ["predict", str(tmp_path / "a.png"), "--model", str(out), "--out", str(tmp_path / "pred")]
    assert main([*args, "--device", "cpu", "--score-threshold", "0", "tokenizer.max_instances=3"]) == 0
    (entry,) = json.loads((tmp_path / "pred" / "detections.json").read_text())["images"]
    assert len(entry["boxes"]) == 3 and set(entry["category_ids"]) <= set(range(1, 91))
    assert main(["weights", "convert", str(tmp_path / "no"), "--arch", "resnet", "--image-size", "96", "--out", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.startswith("pix2seq weights convert: error:") and "\n" not in err


# ------------------------------------------------------------------ layer by layer against Keras


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


def _keras_mha(d: int, heads: int, q_len: int, kv_len: int, seed: int):
    layer = tf.keras.layers.MultiHeadAttention(num_heads=heads, key_dim=d // heads)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, q_len, d), dtype=np.float32)
    kv = rng.standard_normal((2, kv_len, d), dtype=np.float32)
    layer(q, kv, kv)  # builds the weights
    layer.set_weights([rng.standard_normal(w.shape, dtype=np.float32) * 0.2 for w in layer.get_weights()])
    return layer, q, kv


def _kernels(layer) -> dict[str, np.ndarray]:
    """Keras MHA weights by role: query/key/value/output kernel and bias (the checkpoint's order)."""
    names = ("query", "key", "value", "output")
    w = layer.get_weights()  # [q kernel, q bias, k kernel, k bias, v kernel, v bias, out kernel, out bias]
    return {f"{n}/{p}": w[2 * i + j] for i, n in enumerate(names) for j, p in enumerate(("kernel", "bias"))}


@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_equals_keras_mha(causal):
    d, heads = 64, 8
    layer, x, _ = _keras_mha(d, heads, 7, 7, seed=1)
    w = _kernels(layer)
    ours = SelfAttention(d, heads, impl="math")
    with torch.no_grad():
        ours.qkv.weight.copy_(
            torch.cat([_t(w[f"{p}/kernel"]).reshape(d, d).T for p in ("query", "key", "value")])
        )
        ours.qkv.bias.copy_(torch.cat([_t(w[f"{p}/bias"]).reshape(-1) for p in ("query", "key", "value")]))
        ours.proj.weight.copy_(_t(w["output/kernel"]).reshape(d, d).T)
        ours.proj.bias.copy_(_t(w["output/bias"]))
        got = ours(_t(x), causal=causal)
    want = layer(x, x, x, use_causal_mask=causal).numpy()
    torch.testing.assert_close(got, _t(want), atol=ATOL, rtol=0)


def test_cross_attention_equals_keras_mha():
    d, heads = 64, 4
    layer, x, mem = _keras_mha(d, heads, 5, 12, seed=2)
    w = _kernels(layer)
    ours = CrossAttention(d, heads, impl="math")
    with torch.no_grad():
        ours.q.weight.copy_(_t(w["query/kernel"]).reshape(d, d).T)
        ours.q.bias.copy_(_t(w["query/bias"]).reshape(-1))
        ours.kv.weight.copy_(torch.cat([_t(w[f"{p}/kernel"]).reshape(d, d).T for p in ("key", "value")]))
        ours.kv.bias.copy_(torch.cat([_t(w[f"{p}/bias"]).reshape(-1) for p in ("key", "value")]))
        ours.proj.weight.copy_(_t(w["output/kernel"]).reshape(d, d).T)
        ours.proj.bias.copy_(_t(w["output/bias"]))
        got = ours(_t(x), _t(mem))
    torch.testing.assert_close(got, _t(layer(x, mem, mem).numpy()), atol=ATOL, rtol=0)


def test_layernorm_dense_and_gelu_equal_keras():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 6, 32), dtype=np.float32) * 3 + 1
    ln = tf.keras.layers.LayerNormalization(epsilon=1e-6)
    ln(x)
    gamma, beta = rng.standard_normal(32, dtype=np.float32), rng.standard_normal(32, dtype=np.float32)
    ln.set_weights([gamma, beta])
    ours = nn.LayerNorm(32, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(_t(gamma))
        ours.bias.copy_(_t(beta))
        torch.testing.assert_close(ours(_t(x)), _t(ln(x).numpy()), atol=ATOL, rtol=0)
    dense = tf.keras.layers.Dense(48, activation=tf.nn.gelu)  # the official FeedForwardLayer's dense1
    dense(x)
    kernel, bias = (
        rng.standard_normal((32, 48), dtype=np.float32) * 0.3,
        rng.standard_normal(48, dtype=np.float32),
    )
    dense.set_weights([kernel, bias])
    lin = nn.Linear(32, 48)
    with torch.no_grad():
        lin.weight.copy_(_t(kernel).T)
        lin.bias.copy_(_t(bias))
        torch.testing.assert_close(F.gelu(lin(_t(x))), _t(dense(x).numpy()), atol=ATOL, rtol=0)
    z = np.linspace(-6, 6, 1001, dtype=np.float32)
    torch.testing.assert_close(F.gelu(_t(z)), _t(tf.nn.gelu(z, approximate=False).numpy()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("side", [(16, 16), (15, 17), (8, 11)])
def test_same_max_pool_equals_tensorflow(side):
    h, w = side
    x = np.random.default_rng(4).standard_normal((2, h, w, 5), dtype=np.float32)
    want = tf.nn.max_pool2d(x, 3, 2, "SAME").numpy().transpose(0, 3, 1, 2)
    got = SameMaxPool2d()(_t(x).permute(0, 3, 1, 2))
    torch.testing.assert_close(got, _t(want), atol=0, rtol=0)
    if h % 2 == 0:  # PyTorch's symmetric padding differs on even sides: the reason for stem_pool
        assert not torch.equal(nn.MaxPool2d(3, 2, 1)(_t(x).permute(0, 3, 1, 2)), got)


@pytest.mark.parametrize("side", [32, 33])
def test_strided_convs_pad_as_the_official_fixed_padding(side):
    """The official Conv2dFixedPadding (stride 2: pad (k-1)//2 before, the rest after, VALID) equals
    torchvision's ResNet convolutions (7x7 stem, 3x3 and 1x1 strided) with the HWIO kernel mapped."""
    body = Backbone("resnet50", "layer2", pool="same").body
    rng = np.random.default_rng(5)
    for conv in (body.conv1, body.layer2[0].conv2, body.layer2[0].downsample[0]):
        k, cin, cout, stride = conv.kernel_size[0], conv.in_channels, conv.out_channels, conv.stride[0]
        x = rng.standard_normal((1, side, side, cin), dtype=np.float32)
        kernel = rng.standard_normal((k, k, cin, cout), dtype=np.float32) * 0.1
        before = (k - 1) // 2
        padded = tf.pad(x, [[0, 0], [before, k - 1 - before], [before, k - 1 - before], [0, 0]])
        want = tf.nn.conv2d(padded, kernel, stride, "VALID").numpy().transpose(0, 3, 1, 2)
        with torch.no_grad():
            conv.weight.copy_(_t(kernel).permute(3, 2, 0, 1))
            got = conv(_t(x).permute(0, 3, 1, 2))
        assert stride == 2
        torch.testing.assert_close(got, _t(want), atol=ATOL * 10, rtol=1e-5)


def test_batchnorm_inference_equals_keras():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 5, 5, 8), dtype=np.float32)
    bn = tf.keras.layers.BatchNormalization(epsilon=1e-5)
    bn(x)
    stats = [rng.standard_normal(8, dtype=np.float32), rng.standard_normal(8, dtype=np.float32)]
    stats += [rng.standard_normal(8, dtype=np.float32), rng.uniform(0.2, 2, 8).astype(np.float32)]
    bn.set_weights(stats)  # gamma, beta, moving_mean, moving_variance
    ours = nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        for p, a in zip((ours.weight, ours.bias, ours.running_mean, ours.running_var), stats, strict=True):
            p.copy_(_t(a))
        got = ours(_t(x).permute(0, 3, 1, 2))
    torch.testing.assert_close(
        got, _t(bn(x, training=False).numpy().transpose(0, 3, 1, 2)), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("size", [(300, 200), (120, 500), (40, 30)])
def test_official_eval_transform_equals_tensorflow_resize_and_pad(size):
    """model.pixels: official -> x/255, tf.image.resize(bilinear, antialias, aspect kept), 0.3 padding."""
    h, w = size
    img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    canvas, _, _, scale, _ = EvalTransform(128, OFFICIAL_PAD_VALUE)(img, torch.zeros(0, 4), torch.zeros(0))
    x = tf.image.convert_image_dtype(img.permute(1, 2, 0).numpy(), tf.float32)
    r = tf.image.resize(x, (128, 128), method="bilinear", antialias=True, preserve_aspect_ratio=True)
    want = OFFICIAL_PAD_VALUE + tf.image.pad_to_bounding_box(r - OFFICIAL_PAD_VALUE, 0, 0, 128, 128)
    assert canvas.dtype == torch.float32 and scale == pytest.approx(128 / max(h, w))
    torch.testing.assert_close(canvas, _t(want.numpy()).permute(2, 0, 1), atol=ATOL, rtol=0)
    assert math.isclose(float(canvas[0, -1, -1]), OFFICIAL_PAD_VALUE, rel_tol=1e-7)
