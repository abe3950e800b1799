"""generate(): caches, greedy / nucleus / beam, constraints, batching. Tiny model, eval mode.

Freshly initialised weights (std 0.02) make near-uniform logits and a decoder that mostly repeats
its input, which would make equality tests vacuous. ``model`` below re-draws the weights at
PyTorch-default scale (unit-variance activations) with a small output embedding, so the tokens
depend on position, prefix and image; every equality test also checks that its tokens vary.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pix2seq.config import Config, ModelConfig
from pix2seq.decoding import GenerationOutput, generate, nucleus_mask
from pix2seq.detect import decode
from pix2seq.model import build_model
from pix2seq.precision import Choice
from pix2seq.vocab import NOISE, Vocab

NUM_CLASSES, BINS, MAX_INSTANCES, SIZE = 4, 32, 5, 64
N = MAX_INSTANCES


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine a second thread that is descheduled stalls
    every parallel op (measured 10-40x slower), and these tiny shapes gain nothing from it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _make(attention: str = "math", seed: int = 0, box_attention: bool = False, vocab: Vocab | None = None):
    torch.manual_seed(seed)
    cfg = Config()
    cfg.model = ModelConfig(
        backbone="resnet18",
        backbone_stage="layer3",
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        heads=4,
        mlp_dim=128,
        dropout=0.1,
        drop_path=0.1,
        attention=attention,
        box_attention=box_attention,
    )
    cfg.tokenizer.bins = BINS
    cfg.tokenizer.max_instances = MAX_INSTANCES
    vocab = vocab or Vocab(NUM_CLASSES, BINS)
    model, _ = build_model(cfg, vocab)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("backbone"):
                nn.init.normal_(m.weight, std=m.in_features**-0.5)
                nn.init.normal_(m.bias, std=0.1)
        nn.init.normal_(model.token_embed.weight, std=0.1)
        nn.init.normal_(model.pos_embed)
        nn.init.normal_(model.out_bias, std=0.05)
    model.eval()
    return model, vocab


@pytest.fixture(scope="module")
def model_vocab():
    return _make()


@pytest.fixture(scope="module")
def imgs():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    x[1] = x[1] // 4  # a dark one
    x[2, :, : SIZE // 2] = 255  # one with a bright half
    return x


def _varied(tokens: torch.Tensor, vocab: Vocab) -> None:
    """The equality tests are not vacuous: coordinates vary along the sequence and across images."""
    coords = tokens[:, [i for i in range(tokens.shape[1]) if i % 5 != 4]]
    assert len(set(coords.flatten().tolist())) >= 4
    assert all(len(set(row.tolist())) >= 3 for row in coords)


def _assert_same(a: GenerationOutput, b: GenerationOutput) -> None:
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.class_probs, b.class_probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.coords, b.coords, atol=1e-4, rtol=1e-4)


def test_shapes_and_dtypes(model_vocab, imgs):
    model, vocab = model_vocab
    out = generate(model, imgs, vocab, N)
    assert out.tokens.shape == (3, 5 * N) and out.tokens.dtype == torch.long
    assert out.class_probs.shape == (3, N, NUM_CLASSES) and out.class_probs.dtype == torch.float32
    assert (out.class_probs >= 0).all() and (out.class_probs.sum(-1) <= 1 + 1e-5).all()
    assert out.coords.shape == (3, N, 4) and out.coords.dtype == torch.float32
    empty = generate(model, imgs, vocab, 0)
    assert empty.tokens.shape == (3, 0) and empty.class_probs.shape == (3, 0, NUM_CLASSES)
    assert empty.coords.shape == (3, 0, 4)
    with pytest.raises(ValueError, match="coord_window"):
        generate(model, imgs, vocab, N, coord_window=1.5)
    with pytest.raises(ValueError):
        generate(model, imgs, vocab, N + 1)  # past max_seq_len
    with pytest.raises(ValueError):
        generate(model, imgs, vocab, N, cache="bogus")


@pytest.mark.parametrize("box_attention", [False, True])
@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_caches_agree(model_vocab, imgs, method, box_attention):
    # model.box_attention reads the last four input tokens: the cache keeps (and reorders) them
    model, vocab = _make(box_attention=True) if box_attention else model_vocab
    outs = {
        c: generate(model, imgs, vocab, N, method=method, beam_size=3, cache=c, coord_window=0.2)
        for c in ("none", "self", "full")
    }
    _varied(outs["none"].tokens, vocab)
    _assert_same(outs["none"], outs["self"])
    _assert_same(outs["none"], outs["full"])


def test_caches_agree_unconstrained(model_vocab, imgs):
    model, vocab = model_vocab
    ref = generate(model, imgs, vocab, N, constrained=False, cache="none")
    _assert_same(ref, generate(model, imgs, vocab, N, constrained=False, cache="full"))


def test_beam_width_one_equals_greedy(model_vocab, imgs):
    model, vocab = model_vocab
    for constrained in (True, False):
        greedy = generate(model, imgs, vocab, N, constrained=constrained)
        beam = generate(model, imgs, vocab, N, method="beam", beam_size=1, constrained=constrained)
        _varied(greedy.tokens, vocab)
        _assert_same(greedy, beam)


def _sequence_logprob(model, imgs, vocab, tokens):
    """Sum of constrained log-probabilities of ``tokens`` (teacher-forced, full decode)."""
    from pix2seq.decoding import _position_biases

    coord_bias, class_bias = _position_biases(vocab, imgs.device)
    with torch.no_grad():
        prefix = torch.cat([torch.full_like(tokens[:, :1], vocab.prompt), tokens[:, :-1]], 1)
        logits = model(imgs, prefix).float()
        bias = torch.stack([class_bias if i % 5 == 4 else coord_bias for i in range(tokens.shape[1])])
        logp = (logits + bias).log_softmax(-1)
    return logp.gather(2, tokens.unsqueeze(2)).squeeze(2).sum(1)


def _teacher_forced_logits(model, imgs, vocab, tokens):
    """Constrained float32 logits ``(B, L, V)`` at every generated position (full decode)."""
    from pix2seq.decoding import _position_biases

    coord_bias, class_bias = _position_biases(vocab, imgs.device)
    with torch.no_grad():
        prefix = torch.cat([torch.full_like(tokens[:, :1], vocab.prompt), tokens[:, :-1]], 1)
        logits = model(imgs, prefix).float()
    return logits + torch.stack([class_bias if i % 5 == 4 else coord_bias for i in range(tokens.shape[1])])


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_coordinate_readout(model_vocab, imgs, method):
    """coord_window 0 reads the tokens' bins; w > 0 the mean bin within w * (bins - 1) of the token,
    under the distribution the decoder had at that position (recomputed here teacher-forced)."""
    model, vocab = model_vocab
    plain = generate(model, imgs, vocab, N, method=method, beam_size=3)
    groups = plain.tokens.view(3, N, 5)
    assert torch.equal(plain.coords, (groups[..., :4] - vocab.coord_start).float())

    window = 0.25
    out = generate(model, imgs, vocab, N, method=method, beam_size=3, coord_window=window)
    assert torch.equal(out.tokens, plain.tokens)  # the readout never changes what is generated
    coord_logits = _teacher_forced_logits(model, imgs, vocab, out.tokens)
    coord_logits = coord_logits.view(3, N, 5, -1)[:, :, :4, vocab.coord_start : vocab.coord_end]
    p = coord_logits.softmax(-1)  # (3, N, 4, bins)
    bins = torch.arange(BINS, dtype=torch.float32)
    token_bin = plain.coords.unsqueeze(-1)
    p = p * ((bins - token_bin).abs() <= round(window * (BINS - 1)))
    expected = (p * bins).sum(-1) / p.sum(-1)
    torch.testing.assert_close(out.coords, expected, atol=1e-4, rtol=1e-4)
    moved = (out.coords - plain.coords).abs()
    assert (moved > 0.05).float().mean() > 0.5  # not vacuous: the readout moves most coordinates
    assert (moved <= round(window * (BINS - 1))).all()


def test_beam_search_finds_likely_sequences(model_vocab, imgs):
    model, vocab = model_vocab
    greedy = generate(model, imgs, vocab, N)
    beam = generate(model, imgs, vocab, N, method="beam", beam_size=4)
    lp_greedy = _sequence_logprob(model, imgs, vocab, greedy.tokens)
    lp_beam = _sequence_logprob(model, imgs, vocab, beam.tokens)
    assert torch.isfinite(lp_beam).all()
    # with a 4-wide beam the result is at least as likely as greedy's here (not a theorem in general)
    assert (lp_beam >= lp_greedy - 1e-4).all()
    assert not torch.equal(beam.tokens, greedy.tokens)
    # beam_size larger than the number of allowed tokens at the first positions still works
    wide = generate(model, imgs[:1], vocab, 2, method="beam", beam_size=40)
    assert vocab.is_coord(wide.tokens[:, :4]).all()


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_batch_equals_single_images(model_vocab, imgs, method):
    model, vocab = model_vocab
    batch = generate(model, imgs, vocab, N, method=method, beam_size=3)
    _varied(batch.tokens, vocab)
    assert len({tuple(r) for r in batch.tokens.tolist()}) > 1  # images decode differently
    for i in range(3):
        single = generate(model, imgs[i : i + 1], vocab, N, method=method, beam_size=3)
        assert torch.equal(single.tokens, batch.tokens[i : i + 1])
        torch.testing.assert_close(single.class_probs, batch.class_probs[i : i + 1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["greedy", "nucleus", "beam"])
def test_constrained_positions(model_vocab, imgs, method):
    model, vocab = model_vocab
    g = torch.Generator().manual_seed(1)
    out = generate(model, imgs, vocab, N, method=method, top_p=1.0, generator=g, beam_size=2)
    coord_pos = [i for i in range(5 * N) if i % 5 != 4]
    class_pos = [i for i in range(5 * N) if i % 5 == 4]
    assert vocab.is_coord(out.tokens[:, coord_pos]).all()
    cls = out.tokens[:, class_pos]
    assert (vocab.is_class(cls) | (cls == NOISE)).all()


def test_official_vocabulary_generation(imgs):
    """tokenizer.vocab: official: prompt 10, classes 100 + id in label order, NOISE 30; class_probs
    are the class tokens' probabilities in label order, and the caches agree."""
    ids = [{"id": 1}, {"id": 44}, {"id": 90}, {"id": 5}]
    vocab = Vocab.for_categories(ids, BINS, layout="official")
    model, _ = _make(vocab=vocab)
    out = generate(model, imgs, vocab, N)
    _assert_same(out, generate(model, imgs, vocab, N, cache="none"))
    cls = out.tokens[:, 4::5]
    assert (vocab.is_class(cls) | (cls == 30)).all() and vocab.is_coord(
        out.tokens.view(3, N, 5)[..., :4]
    ).all()
    with torch.no_grad():  # the official score: the raw logits' full-vocabulary softmax at the class tokens
        prefix = torch.cat([torch.full_like(out.tokens[:, :1], vocab.prompt), out.tokens[:, :-1]], 1)
        logits = model(imgs, prefix).float().view(3, N, 5, -1)[:, :, 4]
    want = logits.softmax(-1)[..., [101, 144, 190, 105]]
    torch.testing.assert_close(out.class_probs, want, atol=1e-5, rtol=1e-4)


def test_nucleus_is_reproducible_and_seeded(model_vocab, imgs):
    model, vocab = model_vocab

    def run(seed, top_p=1.0, cache="full"):
        g = torch.Generator().manual_seed(seed)
        return generate(model, imgs, vocab, N, method="nucleus", top_p=top_p, generator=g, cache=cache)

    a, b = run(0), run(0)
    _assert_same(a, b)
    _varied(a.tokens, vocab)
    assert not torch.equal(a.tokens, run(1).tokens)
    _assert_same(a, run(0, cache="none"))
    # a vanishing nucleus keeps only the top token: greedy
    _assert_same(run(5, top_p=1e-9), generate(model, imgs, vocab, N))


def _official_kept(logits: torch.Tensor, top_p: float) -> set[int]:
    """The official ``top_logits`` rule for one row, token by token: rank by logit, keep a rank
    while the cumulative probability up to it is <= top_p, always the first; then every token whose
    logit is at least the smallest kept one (the official code cuts by value)."""
    values = logits.tolist()
    if top_p >= 1.0:
        return set(range(len(values)))
    order = sorted(range(len(values)), key=lambda j: -values[j])
    cum = torch.tensor([values[j] for j in order]).softmax(0).cumsum(0).tolist()
    kept = [values[order[0]]] + [values[order[i]] for i in range(len(order)) if cum[i] <= top_p]
    return {j for j, v in enumerate(values) if v >= min(kept)}


def _kept(logits: torch.Tensor, top_p: float) -> set[int]:
    return set(nucleus_mask(logits.unsqueeze(0), top_p)[0].nonzero().flatten().tolist())


def test_nucleus_keeps_the_official_set():
    """Crafted distributions: a dominant token, p reached exactly, ties, p = 1, masked tokens."""
    log = torch.log
    # a dominant token (0.9 > p): only it
    dominant = log(torch.tensor([0.05, 0.9, 0.03, 0.02]))
    assert _kept(dominant, 0.4) == {1}
    # 0.35 <= 0.4 < 0.65: the top token alone (the old rule also kept the second one)
    common = log(torch.tensor([0.2, 0.35, 0.15, 0.3]))
    assert _kept(common, 0.4) == {1}
    assert _kept(common, 0.7) == {1, 3}
    # p equal to a cumulative probability: that rank is kept, the next is not
    row = log(torch.tensor([0.1, 0.4, 0.3, 0.2]))
    ranked = row.sort(descending=True).values
    cum = ranked.softmax(0).cumsum(0)
    for k in range(3):
        assert _kept(row, float(cum[k])) == set(row.argsort(descending=True)[: k + 1].tolist())
    # ties: both top tokens even when one of them alone exceeds p; a tie at the cut stays whole
    assert _kept(torch.tensor([1.0, 1.0, 0.0]), 0.3) == {0, 1}
    tied_cut = torch.tensor([3.0, 1.0, 1.0, 1.0, -2.0])
    assert _kept(tied_cut, 0.9) == {0, 1, 2, 3}
    # p = 1 keeps every token, even improbable ones; a vanishing p keeps the top one
    assert _kept(common, 1.0) == {0, 1, 2, 3}
    assert _kept(common, 1e-9) == {1}
    # a constrained row (-inf entries; probabilities 0.41, 0.31, 0.28): masked tokens never count
    masked = torch.tensor([0.5, float("-inf"), 0.2, float("-inf"), 0.1])
    assert _kept(masked, 0.99) == {0, 2}
    g = torch.Generator().manual_seed(0)
    rows = [dominant, common, row, tied_cut, masked, torch.randn(50, generator=g) * 3]
    for logits in rows:
        for p in (1e-9, 0.1, 0.4, 0.5, 0.75, 0.9, 0.999, 1.0):
            assert _kept(logits, p) == _official_kept(logits, p), (logits, p)
    # batched rows give the same sets as single rows
    batch = torch.randn(8, 30, generator=g) * 2
    mask = nucleus_mask(batch, 0.6)
    assert [set(m.nonzero().flatten().tolist()) for m in mask] == [_official_kept(r, 0.6) for r in batch]


def test_nucleus_samples_only_kept_tokens():
    from pix2seq.decoding import _nucleus

    logits = torch.log(torch.tensor([[0.3, 0.25, 0.2, 0.15, 0.1]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    picked = _nucleus(logits, 0.6, 1.0, g)
    counts = torch.bincount(picked, minlength=5)
    # cumulative 0.3, 0.55, 0.75: the first two only, at their renormalised odds 0.3 : 0.25
    assert counts[2:].sum() == 0 and counts[0] > 0 and counts[1] > 0
    assert abs(counts[0].item() / 4000 - 0.3 / 0.55) < 0.03
    # temperature divides the logits before the rule: at T=2 the distribution flattens
    # (cumulative 0.25, 0.48, 0.68), so p = 0.7 keeps 3 tokens where T=1 keeps 2
    assert set(_nucleus(logits, 0.7, 1.0, g).tolist()) == {0, 1}
    assert set(_nucleus(logits, 0.7, 2.0, g).tolist()) == {0, 1, 2}


def test_class_scores_are_the_full_softmax_restricted_to_classes(model_vocab, imgs):
    """class_probs = softmax over the whole vocabulary of the raw logits, at the class tokens (the
    official score), whether or not generation was constrained."""
    model, vocab = model_vocab
    for constrained in (True, False):
        out = generate(model, imgs, vocab, N, constrained=constrained)
        with torch.no_grad():
            prefix = torch.cat([torch.ones_like(out.tokens[:, :1]), out.tokens[:, :-1]], 1)
            raw = model(imgs, prefix).float()
        ids = list(vocab.class_token_ids)
        expected = raw[:, 4::5].softmax(-1)[..., ids]
        torch.testing.assert_close(out.class_probs, expected, atol=1e-5, rtol=1e-4)
        assert (out.class_probs.sum(-1) < 1 - 1e-3).any()  # not renormalised over the classes


def test_unconstrained_masks_nothing(model_vocab, imgs):
    """constrained=False (the official decoding): every greedy token is the raw logits' argmax."""
    model, vocab = model_vocab
    out = generate(model, imgs, vocab, N, constrained=False)
    with torch.no_grad():
        prefix = torch.cat([torch.ones_like(out.tokens[:, :1]), out.tokens[:, :-1]], 1)
        raw = model(imgs, prefix).float()
    assert torch.equal(out.tokens, raw.argmax(-1))


def test_memory_argument_and_training_mode_restored(model_vocab, imgs):
    model, vocab = model_vocab
    ref = generate(model, imgs, vocab, N)
    with torch.no_grad():
        mem = model.encode(imgs)
    _assert_same(ref, generate(model, None, vocab, N, memory=mem))
    model.train()
    try:
        _assert_same(ref, generate(model, imgs, vocab, N))  # decodes in eval mode (no dropout)
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize("box_attention", [False, True])
def test_bf16_autocast(imgs, box_attention):
    model, vocab = _make(box_attention=box_attention)
    for cache in ("none", "full"):
        out = generate(model, imgs, vocab, N, cache=cache, autocast_dtype=torch.bfloat16)
        assert out.class_probs.dtype == torch.float32
        assert vocab.is_coord(out.tokens[:, 0]).all()
        assert torch.isfinite(out.class_probs).all()


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_a_bf16_encoder_with_float32_steps(imgs, method):
    """step_autocast=False: the encoder runs under bf16 autocast, every decoding step in float32 (the
    precision a CPU measured faster at a small batch): the same outputs as float32 decoding of the
    bf16 encoder's memory, and not those of bf16 steps."""
    model, vocab = _make()
    kw = dict(method=method, beam_size=3)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        memory = model.encode(imgs)
    mixed = generate(model, imgs, vocab, N, autocast_dtype=torch.bfloat16, step_autocast=False, **kw)
    _varied(mixed.tokens, vocab)
    _assert_same(mixed, generate(model, None, vocab, N, memory=memory.float(), **kw))
    bf16 = generate(model, imgs, vocab, N, autocast_dtype=torch.bfloat16, **kw)
    assert not torch.allclose(mixed.class_probs, bf16.class_probs, atol=1e-5)


def test_evaluation_decodes_in_the_step_precision_measured_for_its_rows(imgs):
    """detect.decode asks the precision choice for the step's dtype at batch x beams rows."""
    model, vocab = _make()
    cfg = Config()
    cfg.tokenizer.max_instances = N
    cfg.eval.beam_size = 3
    choice = Choice(torch.bfloat16, "test", step_fp32_rows=(1,))  # fp32 steps near 1 row, bf16 near 16
    ones = torch.ones(3), torch.full((3, 2), SIZE)
    kw = dict(
        coord_window=cfg.eval.coord_window, constrained=cfg.eval.constrained, autocast_dtype=torch.bfloat16
    )
    for method, step_autocast in (("greedy", False), ("beam", True)):  # 3 rows -> 1; 9 rows -> 16
        cfg.eval.decoding = method
        got = decode(model, imgs, vocab, cfg, *ones, choice)
        ref = generate(model, imgs, vocab, N, method=method, beam_size=3, step_autocast=step_autocast, **kw)
        other = generate(
            model, imgs, vocab, N, method=method, beam_size=3, step_autocast=not step_autocast, **kw
        )
        torch.testing.assert_close(got.class_probs, ref.class_probs, atol=1e-6, rtol=0)
        assert not torch.allclose(got.class_probs, other.class_probs, atol=1e-5)


@pytest.mark.parametrize("box_attention", [False, True])
def test_sdpa_and_math_generate_agree(imgs, box_attention):
    m_math, vocab = _make("math", box_attention=box_attention)
    m_sdpa, _ = _make("sdpa", box_attention=box_attention)
    m_sdpa.load_state_dict(m_math.state_dict())
    a = generate(m_math, imgs, vocab, N)
    b = generate(m_sdpa, imgs, vocab, N)
    _varied(a.tokens, vocab)
    _assert_same(a, b)
    beam_math = generate(m_math, imgs, vocab, N, method="beam", beam_size=3)
    _assert_same(beam_math, generate(m_sdpa, imgs, vocab, N, method="beam", beam_size=3))


# ------------------------------------------------------------------------ the compiled step


@pytest.mark.parametrize("box_attention", [False, True])
@pytest.mark.parametrize("cache", ["full", "self"])
@pytest.mark.parametrize("method", ["greedy", "nucleus", "beam"])
def test_static_step_equals_eager(model_vocab, imgs, method, cache, box_attention):
    """The static-shape step (what a CUDA graph or torch.compile runs) decodes what the eager one does."""
    model, vocab = _make(box_attention=True) if box_attention else model_vocab
    kw = dict(method=method, beam_size=3, cache=cache, coord_window=0.2, top_p=0.9)
    eager = generate(model, imgs, vocab, N, step="eager", generator=torch.Generator().manual_seed(1), **kw)
    static = generate(model, imgs, vocab, N, step="static", generator=torch.Generator().manual_seed(1), **kw)
    _varied(eager.tokens, vocab)
    _assert_same(eager, static)


def test_static_step_is_built_once_per_shape_and_sees_weight_updates(imgs):
    from pix2seq.model.compiled_step import compiled_step

    model, vocab = _make(box_attention=True)
    first = generate(model, imgs, vocab, N, step="static")
    assert first.compile_s > 0
    again = generate(model, imgs, vocab, N, step="static")
    assert again.compile_s == 0.0  # reused: only the memory was reloaded
    _assert_same(first, again)
    with torch.inference_mode():  # as generate() runs it
        mem = model.encode(imgs)
        unit = compiled_step(model, mem, 5 * N, "full", 1, "static")
        assert compiled_step(model, mem, 5 * N, "full", 1, "static") is unit
        assert compiled_step(model, mem[:2], 5 * N, "full", 1, "static") is not unit  # another shape
    with torch.no_grad():
        for p in model.decoder.parameters():  # trained further, in place
            p.mul_(1.1)
    _assert_same(
        generate(model, imgs, vocab, N, step="eager"), generate(model, imgs, vocab, N, step="static")
    )
    with pytest.raises(ValueError, match="eval.step"):
        generate(model, imgs, vocab, N, step="graph")  # CUDA graphs need CUDA


def test_compiled_step_equals_eager():
    """torch.compile (inductor) of the static step: same tokens as the eager step; built once."""
    model, vocab = _make(box_attention=True)
    imgs = torch.randint(
        0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(5)
    )
    eager = generate(model, imgs, vocab, N, step="eager")
    compiled = generate(model, imgs, vocab, N, step="compile")
    assert compiled.compile_s > 0
    _varied(eager.tokens, vocab)
    _assert_same(eager, compiled)
    again = generate(model, imgs.flip(0), vocab, N, step="compile")
    assert again.compile_s == 0.0
    _assert_same(generate(model, imgs.flip(0), vocab, N, step="eager"), again)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method", ["greedy", "nucleus", "beam"])
def test_cuda_graph_step_equals_eager(method):
    model, vocab = _make(box_attention=True)
    model.cuda()
    gen = torch.Generator(device="cuda")
    imgs = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8, device="cuda")
    kw = dict(method=method, beam_size=3, top_p=0.9, coord_window=0.2)
    eager = generate(model, imgs, vocab, N, step="eager", generator=gen.manual_seed(1), **kw)
    graph = generate(model, imgs, vocab, N, step="graph", generator=gen.manual_seed(1), **kw)
    assert graph.compile_s > 0
    _varied(eager.tokens.cpu(), vocab)
    _assert_same(eager, graph)
    again = generate(model, imgs, vocab, N, step="graph", generator=gen.manual_seed(1), **kw)
    assert again.compile_s == 0.0
    _assert_same(graph, again)
    # bf16: the graph replays exactly what the static step runs op by op
    amp = dict(autocast_dtype=torch.bfloat16, **kw)
    static = generate(model, imgs, vocab, N, step="static", generator=gen.manual_seed(1), **amp)
    graph = generate(model, imgs, vocab, N, step="graph", generator=gen.manual_seed(1), **amp)
    assert torch.equal(static.tokens, graph.tokens)


def test_generate_reproduces_an_overfit_sequence():
    """Teacher-forced training and autoregressive decoding agree: a memorised sequence comes back."""
    torch.manual_seed(0)
    cfg = Config()
    cfg.model = ModelConfig(
        backbone="resnet18", backbone_stage="layer3", d_model=64, encoder_layers=2, decoder_layers=2, heads=4,
        mlp_dim=128, dropout=0.0, drop_path=0.0, attention="math",
    )  # fmt: skip
    cfg.tokenizer.bins, cfg.tokenizer.max_instances = BINS, MAX_INSTANCES
    vocab = Vocab(NUM_CLASSES, BINS)
    model, criterion = build_model(cfg, vocab)
    g = torch.Generator().manual_seed(3)
    img = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    coords = torch.randint(vocab.coord_start, vocab.coord_end, (2, N, 4), generator=g)
    classes = vocab.label_to_token(torch.randint(0, NUM_CLASSES, (2, N, 1), generator=g))
    target = torch.cat(
        [torch.cat([coords, classes], 2).view(2, 5 * N), torch.zeros(2, 1, dtype=torch.long)], 1
    )
    inputs = torch.cat([torch.full((2, 1), vocab.prompt), target[:, :-1]], 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(120):
        loss = criterion(model(img, inputs), target, torch.ones(target.shape))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3
    for cache in ("none", "full"):
        out = generate(model, img, vocab, N, cache=cache)
        assert (out.tokens == target[:, :-1]).float().mean() >= 0.9
    beam = generate(model, img, vocab, N, method="beam", beam_size=3)
    assert (beam.tokens == target[:, :-1]).float().mean() >= 0.9
    assert model.training
