"""Model: backbone, transformer, Pix2Seq forward/backward, loss. Tiny configs only (2 CPU cores)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from pix2seq.config import Config, ModelConfig
from pix2seq.model import Pix2Seq, SequenceLoss, build_model, max_seq_len
from pix2seq.model.backbone import Backbone, SameMaxPool2d
from pix2seq.model.transformer import DropPath, EncoderLayer, attention, causal_mask, sincos_2d, use_sdpa
from pix2seq.vocab import EOS, PROMPT, Vocab

NUM_CLASSES, BINS, MAX_INSTANCES, SIZE = 4, 32, 5, 64
# the official model's switches (pix2seq.weights.convert writes them with max_seq_len 512)
OFFICIAL = dict(pixels="official", stem_pool="same", ln_eps=1e-6, pos_normalize=True, max_seq_len=40)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine a second thread that is descheduled stalls
    every parallel op (measured 10-40x slower), and these tiny shapes gain nothing from it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_cfg(**model) -> Config:
    cfg = Config()
    base = dict(
        backbone="resnet18",
        backbone_stage="layer3",
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        heads=4,
        mlp_dim=128,
        dropout=0.0,
        drop_path=0.0,
        attention="math",
    )
    base.update(model)
    cfg.model = ModelConfig(**base)
    cfg.tokenizer.bins = BINS
    cfg.tokenizer.max_instances = MAX_INSTANCES
    return cfg


def tiny_model(seed: int = 0, **model) -> tuple[Pix2Seq, SequenceLoss, Vocab]:
    torch.manual_seed(seed)
    vocab = Vocab(NUM_CLASSES, BINS)
    m, crit = build_model(tiny_cfg(**model), vocab)
    return m, crit, vocab


def images(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)


def tokens(b: int, vocab: Vocab, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab.vocab_size, (b, 5 * MAX_INSTANCES + 1), generator=g)


# ------------------------------------------------------------------------------------ backbone


@pytest.mark.parametrize(
    "name,stage,channels,stride",
    [
        ("resnet18", "layer2", 128, 8),
        ("resnet18", "layer3", 256, 16),
        ("resnet18", "layer4", 512, 32),
        ("resnet50", "layer2", 512, 8),
        ("resnet50", "layer4", 2048, 32),
    ],
)
def test_backbone_channels_and_stride(name, stage, channels, stride):
    with torch.device("meta"):
        bb = Backbone(name, stage, pretrained=False)
    assert bb.num_channels == channels and bb.stride == stride
    assert hasattr(bb.body, "maxpool")
    assert ("layer4" in dict(bb.body.named_children())) == (stage == "layer4")
    assert any(isinstance(m, nn.BatchNorm2d) for m in bb.modules())
    assert all(p.requires_grad for p in bb.parameters())
    if name == "resnet18":
        real = Backbone(name, stage)
        out = real(torch.randn(1, 3, SIZE, SIZE))
        assert out.shape == (1, channels, SIZE // stride, SIZE // stride)


def test_pretrained_backbone_uses_frozen_batchnorm(monkeypatch):
    """pretrained=True asks torchvision for ImageNet weights (faked here: no network in tests)."""
    calls = {}
    real_ctor = torchvision.models.resnet18

    class FakeWeights:
        IMAGENET1K_V1 = "imagenet-v1"

    def fake_ctor(weights=None, **kw):
        calls["weights"] = weights
        return real_ctor(weights=None, **kw)

    monkeypatch.setattr(torchvision.models, "resnet18", fake_ctor)
    monkeypatch.setattr(torchvision.models, "get_model_weights", lambda name: FakeWeights)
    bb = Backbone("resnet18", "layer3", pretrained=True)  # norm "auto" -> frozen
    assert calls["weights"] == "imagenet-v1"
    assert not any(type(m) is nn.BatchNorm2d for m in bb.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in bb.modules())
    frozen = {n for n, p in bb.named_parameters() if not p.requires_grad}
    assert "conv1.weight" in {n.removeprefix("body.") for n in frozen}
    assert all(p.requires_grad for n, p in bb.named_parameters() if ".layer3." in f".{n}")


@pytest.mark.parametrize(
    "norm,kind", [("batch", nn.BatchNorm2d), ("frozen", FrozenBatchNorm2d), ("group", nn.GroupNorm)]
)
def test_backbone_norm_choices(norm, kind):
    bb = Backbone("resnet18", "layer3", pretrained=False, norm=norm)
    norms = [m for m in bb.modules() if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d | nn.GroupNorm)]
    assert norms and all(isinstance(m, kind) for m in norms)
    assert Backbone("resnet18", "layer3", norm="auto").norm == "batch"
    if norm == "group":  # independent of the batch, even in training mode
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(bb(x)[:1], bb(x[:1]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        Backbone("resnet18", "layer3", norm="bogus")


# --------------------------------------------------------------------------------- transformer


def test_sincos_2d_shape_and_distinct_rows():
    pos = sincos_2d(3, 5, 16)
    assert pos.shape == (15, 16)
    assert torch.cdist(pos, pos).add(torch.eye(15)).min() > 0.1


def test_attention_sdpa_and_math_agree():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 7, 16).unbind(0)
    for causal in (False, True):
        a = attention(q, k, v, "math", causal=causal)
        b = attention(q, k, v, "sdpa", causal=causal)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a = attention(q, k, v, "math", causal=True, mask=causal_mask(7, q.device))
    torch.testing.assert_close(a, attention(q, k, v, "sdpa", causal=True), atol=1e-5, rtol=1e-5)
    assert not use_sdpa("auto", q)  # CPU -> math
    with pytest.raises(ValueError):
        use_sdpa("bogus", q)


def test_model_sdpa_and_math_agree():
    m_math, _, vocab = tiny_model(attention="math")
    m_sdpa, _, _ = tiny_model(attention="sdpa")
    m_sdpa.load_state_dict(m_math.state_dict())
    m_math.eval()
    m_sdpa.eval()
    img, tok = images(2), tokens(2, vocab)
    with torch.no_grad():
        torch.testing.assert_close(m_math(img, tok), m_sdpa(img, tok), atol=1e-4, rtol=1e-4)


def test_no_dropout_modules_when_probability_is_zero():
    m, _, _ = tiny_model(dropout=0.0, drop_path=0.0)
    assert not any(isinstance(x, nn.Dropout | DropPath) for x in m.modules())
    m, _, _ = tiny_model(dropout=0.1, drop_path=0.1)
    assert any(isinstance(x, nn.Dropout) for x in m.modules())
    assert any(isinstance(x, DropPath) for x in m.modules())


def test_drop_path_is_per_sample_and_identity_in_eval():
    dp = DropPath(0.5)
    x = torch.ones(64, 3, 2)
    y = dp(x)
    per_sample = y.flatten(1)
    assert set(per_sample[:, 0].tolist()) <= {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()
    dp.eval()
    assert torch.equal(dp(x), x)


# ---------------------------------------------------------------------------------------- model


def test_forward_backward_finite_and_all_grads():
    m, crit, vocab = tiny_model(dropout=0.1, drop_path=0.1)
    m.train()
    img, tok = images(2), tokens(2, vocab)
    logits = m(img, tok)
    assert logits.shape == (2, 5 * MAX_INSTANCES + 1, vocab.vocab_size)
    assert torch.isfinite(logits).all()
    loss = crit(logits, tokens(2, vocab, seed=1), torch.ones(tok.shape))
    assert torch.isfinite(loss) and loss.ndim == 0
    # near-uniform predictions at init: loss close to ln(V)
    assert abs(loss.item() - math.log(vocab.vocab_size)) < 1.0
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert m.out_bias.grad.abs().sum() > 0 and m.pos_embed.grad.abs().sum() > 0


def test_float_and_uint8_images_agree():
    m, _, _ = tiny_model()
    m.eval()
    img = images(2)
    with torch.no_grad():
        torch.testing.assert_close(m.encode(img), m.encode(img.float() / 255.0))


def test_encode_shape_and_causality():
    m, _, vocab = tiny_model()
    m.eval()
    img, tok = images(1), tokens(1, vocab)
    with torch.no_grad():
        mem = m.encode(img)
        assert mem.shape == (1, (SIZE // 16) ** 2, 64)
        full = m.decode(tok, mem)
        tok2 = tok.clone()
        tok2[:, 10:] = 0  # later tokens must not change earlier logits
        torch.testing.assert_close(m.decode(tok2, mem)[:, :10], full[:, :10])
        torch.testing.assert_close(m.decode(tok[:, :7], mem, last_only=True), full[:, 6])


@pytest.mark.parametrize("switches", [{}, OFFICIAL], ids=["ours", "official"])
@pytest.mark.parametrize("cross", ["full", "self"])
@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_decode_step_matches_full_decode(cross, impl, switches):
    m, _, vocab = tiny_model(attention=impl, **switches)
    m.eval()
    tok = tokens(2, vocab)[:, :12]
    with torch.no_grad():
        mem = m.encode(images(2))
        full = m.decode(tok, mem)
        cache = m.init_cache(mem, 12, cross=cross)
        assert cache.eps == m.cfg.ln_eps
        steps = torch.stack([m.decode_step(tok[:, t], cache) for t in range(12)], 1)
        static = m.init_cache(mem, 12, cross=cross, static=True)
        pos = torch.zeros(1, dtype=torch.long)
        fixed = torch.stack([m.decode_step_static(tok[:, t], pos.fill_(t), static) for t in range(12)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fixed, full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        m.decode_step(tok[:, 0], cache)  # past the end of the cache


def test_official_switches():
    """pixels: official (no mean/std), stem_pool: same, ln_eps everywhere, max_seq_len; the defaults
    keep this project's model (ImageNet mean/std, PyTorch's pool and eps, 5 * max_instances + 1)."""
    m, _, _ = tiny_model(**OFFICIAL)
    assert {x.eps for x in m.modules() if isinstance(x, nn.LayerNorm)} == {1e-6}
    assert isinstance(m.backbone.body.maxpool, SameMaxPool2d) and m.pos_embed.shape == (40, 64)
    x = torch.rand(2, 3, SIZE, SIZE)
    u8 = (x * 255).byte()
    assert torch.equal(m.normalize(x), x)
    torch.testing.assert_close(m.normalize(u8), u8 / 255.0)
    d, _, _ = tiny_model()
    assert {x.eps for x in d.modules() if isinstance(x, nn.LayerNorm)} == {1e-5}
    assert isinstance(d.backbone.body.maxpool, nn.MaxPool2d) and d.pos_embed.shape[0] == 5 * MAX_INSTANCES + 1
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(d.normalize(x), (x - mean.view(3, 1, 1)) / std.view(3, 1, 1))


@pytest.mark.parametrize("n", [16, 15])
def test_same_max_pool_windows(n):
    """TensorFlow's SAME: an even side pads 0 before / 1 after (windows start at 0, 2, ...), an odd
    side 1 / 1 (as PyTorch's padding=1); both give ceil(n / 2) cells."""
    x = torch.rand(1, 1, n, n)
    y = SameMaxPool2d()(x)
    assert y.shape[-1] == (n + 1) // 2
    first = x[..., :3, :3] if n % 2 == 0 else x[..., :2, :2]
    assert y[0, 0, 0, 0] == first.max()
    assert torch.equal(y, nn.MaxPool2d(3, 2, 1)(x)) == (n % 2 == 1)


def test_normalised_positions_are_the_official_code():
    """pos_normalize: [sin y, cos y, sin x, cos x], dim/4 frequencies 10000^(-k / (dim/4)), cell
    coordinates i / (n - 1) * 2 pi; a single row or column: the 1-D code of the flat index."""
    h, w, d = 3, 5, 16
    omega = 10000.0 ** (-torch.arange(4) / 4)
    y = (torch.arange(h).repeat_interleave(w) / (h - 1) * 6.2831852)[:, None] * omega
    x = (torch.arange(w).repeat(h) / (w - 1) * 6.2831852)[:, None] * omega
    want = torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], 1)
    torch.testing.assert_close(sincos_2d(h, w, d, normalize=True), want)
    p = (torch.arange(w) / (w - 1) * 6.2831852)[:, None] * 10000.0 ** (-torch.arange(8) / 8)
    one = torch.cat([p.sin(), p.cos()], 1)
    torch.testing.assert_close(sincos_2d(1, w, d, normalize=True), one)
    torch.testing.assert_close(sincos_2d(w, 1, d, normalize=True), one)
    yi = torch.arange(h).repeat_interleave(w)[:, None] * omega  # the default: cell indices
    torch.testing.assert_close(sincos_2d(h, w, d)[:, :8], torch.cat([yi.sin(), yi.cos()], 1))
    assert torch.isfinite(sincos_2d(1, 1, d, normalize=True)).all()  # official: NaN (0 / 0)


def test_no_residual_dropout_only_inside_the_mlp():
    """Official placement: dropout inside the MLP, drop-path on the branches, no dropout on the
    residual branches: with the MLP's output layer zeroed and no drop-path, a training-mode layer
    is deterministic however high the dropout."""
    layer = EncoderLayer(32, 4, 64, dropout=0.5, drop_path=0.0, impl="math").train()
    with torch.no_grad():
        layer.mlp.fc2.weight.zero_()
    x = torch.randn(2, 6, 32)
    assert torch.equal(layer(x), layer(x))
    m, _, _ = tiny_model(dropout=0.1, drop_path=0.1)
    drops = sorted(n for n, x in m.named_modules() if isinstance(x, nn.Dropout))
    paths = sorted(n for n, x in m.named_modules() if isinstance(x, DropPath))
    stacks = [f"{s}.layers.{i}" for s in ("decoder", "encoder") for i in range(2)]
    assert drops == ["bridge_mlp.drop", *[f"{s}.mlp.drop" for s in stacks], "feature_drop"]
    assert paths == ["bridge_drop_path", *[f"{s}.drop_path" for s in stacks]]


def test_build_model_sequence_length_and_init():
    cfg = tiny_cfg()
    m, crit = build_model(cfg, Vocab(NUM_CLASSES, BINS))
    assert isinstance(crit, SequenceLoss)
    assert m.max_seq_len == max_seq_len(cfg) == 5 * MAX_INSTANCES + 1
    assert m.pos_embed.shape == (m.max_seq_len, 64)
    w = m.decoder.layers[0].mlp.fc1.weight
    assert 0.01 < w.std().item() < 0.03 and w.abs().max() <= 0.04 + 1e-6
    assert m.decoder.layers[0].mlp.fc1.bias.abs().sum() == 0
    assert m.out_bias.abs().sum() == 0


def test_sincos_coordinate_init_orders_the_bins():
    """coord_init=sincos: neighbouring bins start out more alike than distant ones; classes stay random."""
    v = Vocab(NUM_CLASSES, BINS)
    torch.manual_seed(0)
    m, _ = build_model(tiny_cfg(coord_init="sincos"), v)
    e = nn.functional.normalize(m.token_embed.weight[v.coord_start : v.coord_end], dim=1)
    sim = e @ e.T
    near = torch.diagonal(sim, 1).mean().item()
    far = torch.diagonal(sim, BINS // 2).mean().item()
    assert near > 0.8 and far < 0.3, (near, far)
    assert 0.015 < m.token_embed.weight[v.coord_start : v.coord_end].std().item() < 0.025
    torch.manual_seed(0)
    r, _ = build_model(tiny_cfg(), v)
    er = nn.functional.normalize(r.token_embed.weight[v.coord_start : v.coord_end], dim=1)
    assert abs(torch.diagonal(er @ er.T, 1).mean().item()) < 0.2  # random init: no order
    assert torch.equal(m.token_embed.weight[: v.coord_start], r.token_embed.weight[: v.coord_start])


def test_pos_temperature_changes_the_image_positions():
    a = sincos_2d(8, 8, 64)
    b = sincos_2d(8, 8, 64, temperature=20.0)
    # the lowest frequency of temperature 20 still varies across 8 cells; 10000's is flat
    q = 64 // 4
    assert (b[:, q - 1].max() - b[:, q - 1].min()) > 0.3 > (a[:, q - 1].max() - a[:, q - 1].min())
    torch.manual_seed(0)
    m, _ = build_model(tiny_cfg(pos_temperature=20.0), Vocab(NUM_CLASSES, BINS))
    torch.manual_seed(0)
    n, _ = build_model(tiny_cfg(), Vocab(NUM_CLASSES, BINS))
    x = torch.rand(1, 3, SIZE, SIZE)
    assert not torch.allclose(m.eval().encode(x), n.eval().encode(x))


def test_box_attention_looks_at_the_box_from_class_positions():
    """model.box_attention: the cross-attention logits of the query before each class token get a
    Gaussian prior around the box named by the four coordinates before it; other positions do not."""
    v = Vocab(NUM_CLASSES, BINS)
    m, _, _ = tiny_model(box_attention=True)
    side = SIZE // 16  # layer3: stride 16 -> a 4 x 4 memory
    # the box covers feature cell (row 1, col 2) exactly
    box = v.quantize(torch.tensor([1.0, 2.0, 2.0, 3.0]) / side)
    bias = m.box_attention_bias(box, side * side).view(side, side)
    assert bias.argmax().item() == 1 * side + 2 and bias.max().item() > -0.05
    assert bias[1, 3].item() == pytest.approx(-2.0, abs=0.2)  # one cell right: two half-box widths
    assert bias[3, 0].item() < bias[1, 0].item() < bias[1, 1].item()
    with pytest.raises(ValueError, match="square feature grid"):
        m.box_attention_bias(box, 12)

    tokens = torch.cat(
        [torch.tensor([PROMPT]), box, torch.tensor([v.class_token_ids[0]]), box, torch.tensor([EOS])]
    )
    tokens = tokens[None]  # (1, 11): prompt, an object, a second box, EOS
    mem = m.eval().encode(images(1))
    plain, _, _ = tiny_model(box_attention=False)
    plain.load_state_dict(m.state_dict())
    with torch.no_grad():
        a, b = m.eval().decode(tokens, mem), plain.eval().decode(tokens, mem)
    differs = [(a[0, t] - b[0, t]).abs().max().item() > 1e-5 for t in range(tokens.shape[1])]
    # causal: position 4 (input xmax of object 1) and everything after it see the prior
    assert differs == [False] * 4 + [True] * 7


def test_param_count_of_default_coco_config():
    """resnet50 C5, 6+6 layers, d 256, MLP 1024, 1000 bins, 80 classes (official: 36.6 M with a
    3000-token vocabulary; ours has 1083 tokens, 0.49 M fewer embedding parameters)."""
    cfg = Config()
    with torch.device("meta"):
        m, _ = build_model(cfg, Vocab(80, cfg.tokenizer.bins))
    total = sum(p.numel() for p in m.parameters())
    backbone = sum(p.numel() for p in m.backbone.parameters())
    print(f"COCO default: {total / 1e6:.2f} M parameters ({backbone / 1e6:.2f} M backbone)")
    assert 35.0e6 < total < 37.5e6
    assert 23.0e6 < backbone < 24.0e6


# ----------------------------------------------------------------------------------------- loss


def test_loss_equals_manual_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    targets = torch.randint(0, 11, (2, 6))
    weights = torch.rand(2, 6)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), reduction="none")
    manual = (ce * weights.reshape(-1)).sum() / weights.sum()
    torch.testing.assert_close(SequenceLoss()(logits, targets, weights), manual)


def test_zero_weight_tokens_do_not_affect_the_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    targets = torch.randint(0, 11, (2, 6))
    weights = torch.ones(2, 6)
    weights[:, 3:] = 0
    crit = SequenceLoss()
    base = crit(logits, targets, weights)
    other_t, other_l = targets.clone(), logits.detach().clone()
    other_t[:, 3:] = (other_t[:, 3:] + 1) % 11
    other_l[:, 3:] = torch.randn(2, 3, 11) * 10
    torch.testing.assert_close(crit(other_l, other_t, weights), base.detach())
    torch.testing.assert_close(base, crit(logits[:, :3], targets[:, :3], weights[:, :3]))
    base.backward()
    assert logits.grad[:, 3:].abs().sum() == 0
    # all-zero weights: 0, not NaN
    assert crit(logits, targets, torch.zeros(2, 6)).item() == 0.0


def test_soft_coordinate_targets():
    """tokenizer.coord_sigma: coordinate targets become a Gaussian over the bins; other tokens keep
    their one-hot cross-entropy; a vanishing sigma is the one-hot loss."""
    torch.manual_seed(0)
    start, end = 4, 14  # 10 coordinate bins in a vocabulary of 16
    logits = torch.randn(2, 6, 16)
    targets = torch.tensor([[5, 9, 13, 2, 0, 15], [4, 7, 1, 10, 3, 8]])
    weights = torch.rand(2, 6)
    hard = SequenceLoss()(logits, targets, weights)
    torch.testing.assert_close(
        SequenceLoss(coord_sigma=1e-3, coord_tokens=(start, end))(logits, targets, weights), hard
    )
    sigma = 1.5
    logp = logits.log_softmax(-1)
    bins = torch.arange(end - start, dtype=torch.float32)
    manual = torch.empty(2, 6)
    for b in range(2):
        for t in range(6):
            y = int(targets[b, t])
            if start <= y < end:
                q = torch.exp(-0.5 * ((bins - (y - start)) / sigma) ** 2)
                manual[b, t] = -(q / q.sum() * logp[b, t, start:end]).sum()
            else:
                manual[b, t] = -logp[b, t, y]
    expected = (manual * weights).sum() / weights.sum()
    soft = SequenceLoss(coord_sigma=sigma, coord_tokens=(start, end))(logits, targets, weights)
    torch.testing.assert_close(soft, expected)
    assert soft > hard - 1.0 and not torch.isclose(soft, hard)  # not vacuous
    _, crit, vocab = tiny_model()
    assert crit.kernel.numel() == 0  # the paper's one-hot by default
    cfg = tiny_cfg()
    cfg.tokenizer.coord_sigma = 1.0
    _, crit = build_model(cfg, vocab)
    assert crit.kernel.shape == (vocab.bins, vocab.bins)
    assert crit.coord_tokens == (vocab.coord_start, vocab.coord_end)
    with pytest.raises(ValueError, match="coord_tokens"):
        SequenceLoss(coord_sigma=1.0)


def test_loss_is_float32_under_bf16_autocast():
    m, crit, vocab = tiny_model()
    img, tok = images(2), tokens(2, vocab)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(img, tok)
        loss = crit(logits, tok, torch.ones(tok.shape))
    assert logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with pytest.raises(ValueError):
        crit(logits, tok[:, :3], torch.ones(tok.shape))
