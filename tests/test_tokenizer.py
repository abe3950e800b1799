"""Vocabulary layout, quantisation and the sequence augmentation invariants (spec sections 1-3, 5)."""

from __future__ import annotations

import pytest
import torch

from pix2seq.config import ConfigError, TokenizerConfig
from pix2seq.tokenizer import (
    build_sequence,
    noise_boxes,
    sequence_length,
    sequence_to_objects,
    tokens_to_detections,
    truncated_normal,
)
from pix2seq.vocab import EOS, NOISE, PAD, PROMPT, Vocab


def _boxes(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 0.6
    wh = 0.05 + torch.rand(n, 2, generator=g) * 0.3
    return torch.cat([xy, xy + wh], 1), torch.randint(0, 5, (n,), generator=g)


def test_vocab_ranges_disjoint_and_derived():
    v = Vocab(num_classes=80, bins=1000)
    assert v.vocab_size == 3 + 80 + 1000
    assert v.class_token_ids == tuple(range(3, 83)) and (v.pad, v.eos, v.prompt, v.noise) == (
        PAD,
        EOS,
        PROMPT,
        NOISE,
    )
    assert max(v.class_token_ids) < v.coord_start and v.coord_end == v.vocab_size
    assert Vocab(num_classes=4, bins=128, vocab_size=3000).vocab_size == 3000
    coord, cls = v.allowed_mask("coord"), v.allowed_mask("class")
    assert int(coord.sum()) == 1000 and int(cls.sum()) == 81 and not (coord & cls).any()
    assert cls[NOISE] and not cls[PAD]


COCO_LIKE = [{"id": 1, "name": "person"}, {"id": 90, "name": "toothbrush"}, {"id": 44, "name": "bottle"}]


def test_official_vocabulary_layout():
    """tokenizer.vocab: official: 0 PAD/EOS, 10 prompt, 30 NOISE, 100 + category id, 1000 + bin."""
    v = Vocab.for_categories(COCO_LIKE, 1000, layout="official")
    assert (v.pad, v.eos, v.prompt, v.noise, v.coord_start, v.vocab_size) == (0, 0, 10, 30, 1000, 3000)
    assert v.class_token_ids == (101, 190, 144)
    labels = torch.tensor([2, 0, 1])
    assert v.label_to_token(labels).tolist() == [144, 101, 190]
    assert v.token_to_label(torch.tensor([144, 101, 190, 30, 102, 1500])).tolist() == [2, 0, 1, -1, -1, -1]
    assert v.is_class(torch.tensor([101, 30, 100, 999, 1000])).tolist() == [True] + [False] * 4
    assert v.allowed_mask("class").nonzero().flatten().tolist() == [30, 101, 144, 190]
    assert v.quantize(torch.tensor([0.0, 1.0])).tolist() == [1000, 1999]
    assert Vocab(**v.to_dict()) == v and v.to_dict()["category_ids"] == [1, 90, 44]
    old = {"num_classes": 5, "bins": 32, "vocab_size": 40}  # a checkpoint from before the layouts
    assert Vocab(**old).layout == "compact" and Vocab(**old).class_token_ids == (3, 4, 5, 6, 7)


def test_official_vocabulary_rejects_ids_without_a_class_token():
    with pytest.raises(ConfigError, match=r"^tokenizer.vocab: official: category 'kite' \(id 900\)"):
        Vocab.for_categories([*COCO_LIKE, {"id": 900, "name": "kite"}], 1000, layout="official")
    with pytest.raises(ConfigError, match="^tokenizer.vocab: official needs"):
        Vocab(3, 1000, layout="official")
    assert Vocab.for_categories([{"id": 900, "name": "kite"}], 1000).class_token_ids == (
        3,
    )  # compact: any id


def test_official_vocabulary_sequences():
    v = Vocab.for_categories(COCO_LIKE, 1000, layout="official")
    cfg = TokenizerConfig(bins=1000, max_instances=6, vocab="official")
    boxes, labels = _boxes(3)
    labels = labels % 3
    inp, tgt, w = build_sequence(boxes, labels, v, cfg, torch.Generator().manual_seed(0))
    objs, in_objs = tgt[:-1].reshape(6, 5), inp[1:].reshape(6, 5)
    assert int(inp[0]) == 10 and int(tgt[-1]) == 0
    assert bool((objs[3:, 4] == 30).all()) and bool(v.is_coord(objs[:, :4]).all())
    assert sorted(v.token_to_label(objs[:3, 4]).tolist()) == sorted(labels.tolist())
    assert set(in_objs[:, 4].tolist()) <= {30, 101, 144, 190}
    _, tgt, _ = build_sequence(boxes, labels, v, cfg, train=False)
    back, back_labels = sequence_to_objects(tgt, v)
    assert torch.equal(back_labels, labels) and (back - boxes).abs().max() <= 0.5 / 999 + 1e-6


@pytest.mark.parametrize("bins", [2, 7, 128, 1000])
def test_quantise_within_half_a_bin(bins):
    v = Vocab(num_classes=3, bins=bins)
    x = torch.linspace(0, 1, 1001)
    q = v.quantize(x)
    assert bool(v.is_coord(q).all())
    assert (v.dequantize(q) - x).abs().max() <= 0.5 / (bins - 1) + 1e-6
    assert int(v.quantize(torch.tensor([-0.3, 1.7]))[0]) == v.coord_start
    assert int(v.quantize(torch.tensor([1.7]))[0]) == v.coord_end - 1


def test_boxes_tokens_boxes_identity():
    v = Vocab(num_classes=5, bins=256)
    cfg = TokenizerConfig(bins=256, max_instances=10)
    boxes, labels = _boxes(7)
    inp, tgt, w = build_sequence(boxes, labels, v, cfg, train=False)
    back, back_labels = sequence_to_objects(tgt, v)
    assert torch.equal(back_labels, labels)
    assert (back - boxes).abs().max() <= 0.5 / 255 + 1e-6
    # eval sequences: real tokens then EOS, weights 1 then eos_weight
    assert int(tgt[35]) == EOS and bool((w[:35] == 1).all()) and bool((w[35:] == cfg.eos_weight).all())
    assert int(inp[0]) == PROMPT and torch.equal(inp[1:36], tgt[:35])


def test_random_order_permutes_objects():
    v = Vocab(num_classes=5, bins=256)
    cfg = TokenizerConfig(
        bins=256, max_instances=10, augment_sequence=False, class_corruption=False, order="random"
    )
    boxes, labels = _boxes(6)
    orders = set()
    for s in range(10):
        _, tgt, _ = build_sequence(boxes, labels, v, cfg, torch.Generator().manual_seed(s))
        b, _ = sequence_to_objects(tgt, v)
        assert b.shape == (6, 4)
        orders.add(tuple(b[:, 0].tolist()))
        # the same set of boxes, whatever the order
        assert torch.allclose(b[b[:, 0].argsort()], v.dequantize(v.quantize(boxes))[boxes[:, 0].argsort()])
    assert len(orders) > 1


def test_augmentation_invariants():
    v = Vocab(num_classes=5, bins=128)
    cfg = TokenizerConfig(bins=128, max_instances=12)
    boxes, labels = _boxes(4)
    T = sequence_length(12)
    for s in range(20):
        inp, tgt, w = build_sequence(boxes, labels, v, cfg, torch.Generator().manual_seed(s))
        assert inp.shape == tgt.shape == w.shape == (T,)
        objs = tgt[:-1].reshape(12, 5)
        wo = w[:-1].reshape(12, 5)
        # filled to max_instances: 4 real objects, 8 noise objects, EOS only in the last slot
        assert int(tgt[-1]) == EOS and not bool((objs == EOS).any())
        real, noise = objs[:4], objs[4:]
        assert bool((noise[:, 4] == NOISE).all()), "noise class target is NOISE"
        assert bool((wo[4:, :4] == 0).all()), "noise coordinates weigh 0"
        assert bool((wo[4:, 4] == 1).all()) and bool((wo[:4] == 1).all())
        assert bool(v.is_coord(objs[:, :4]).all()) and bool(v.is_class(real[:, 4]).all())
        # targets keep the true classes; input class tokens are all corrupted (random class or NOISE)
        assert sorted(v.token_to_label(real[:, 4]).tolist()) == sorted(labels.tolist())
        in_objs = inp[1:].reshape(12, 5)
        assert torch.equal(in_objs[:, :4], objs[:, :4]), "coordinates are fed as they are"
        assert bool((v.is_class(in_objs[:, 4]) | (in_objs[:, 4] == NOISE)).all())


def test_class_corruption_changes_inputs_only():
    v = Vocab(num_classes=20, bins=64)
    boxes, labels = _boxes(8)
    on = TokenizerConfig(bins=64, max_instances=8, augment_sequence=False)
    off = TokenizerConfig(bins=64, max_instances=8, augment_sequence=False, class_corruption=False)
    g = torch.Generator().manual_seed(0)
    inp, tgt, _ = build_sequence(boxes, labels, v, on, g)
    in_cls, tgt_cls = inp[1:41].reshape(8, 5)[:, 4], tgt[:40].reshape(8, 5)[:, 4]
    assert (in_cls == NOISE).any() and (in_cls != tgt_cls).any()
    inp2, tgt2, _ = build_sequence(boxes, labels, v, off, torch.Generator().manual_seed(0))
    assert torch.equal(inp2[1:41], tgt2[:40])


def test_empty_image():
    v = Vocab(num_classes=3, bins=64)
    cfg = TokenizerConfig(bins=64, max_instances=5)
    none = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    inp, tgt, w = build_sequence(*none, v, cfg, torch.Generator().manual_seed(1))
    objs = tgt[:-1].reshape(5, 5)
    assert bool((objs[:, 4] == NOISE).all()) and bool((w[:-1].reshape(5, 5)[:, :4] == 0).all())
    # evaluation: just EOS and padding
    inp, tgt, w = build_sequence(*none, v, cfg, train=False)
    assert bool((tgt == PAD).all()) and int(inp[0]) == PROMPT and bool((inp[1:] == PAD).all())
    assert bool((w == cfg.eos_weight).all())


def test_more_objects_than_max_instances_are_truncated():
    v = Vocab(num_classes=5, bins=64)
    cfg = TokenizerConfig(bins=64, max_instances=3)
    boxes, labels = _boxes(9)
    inp, tgt, w = build_sequence(boxes, labels, v, cfg, torch.Generator().manual_seed(0))
    assert tgt.shape == (16,) and int(tgt[15]) == EOS
    assert bool(v.is_class(tgt[:15].reshape(3, 5)[:, 4]).all())


def test_noise_kinds_and_seed_variant():
    v = Vocab(num_classes=5, bins=64)
    boxes, labels = _boxes(2)
    g = torch.Generator().manual_seed(0)
    dup_only = TokenizerConfig(noise_shifted=False, noise_random=False)
    nb = noise_boxes(boxes, 50, dup_only, g)
    assert nb.shape[0] <= 50 and bool(((nb >= 0) & (nb <= 1)).all())
    shift_only = TokenizerConfig(noise_duplicates=False, noise_random=False)
    nb = noise_boxes(boxes, 40, shift_only, g)
    real_sizes = boxes[:, 2:] - boxes[:, :2]  # (2, 2)
    inside = ((nb > 0) & (nb < 1)).all(1)
    assert inside.sum() > 10
    shifted_sizes = (nb[:, 2:] - nb[:, :2])[inside]  # unclipped shifted boxes keep a real box's size
    dist = (shifted_sizes[:, None] - real_sizes[None]).abs().amax(-1).amin(-1)
    assert float(dist.max()) < 1e-5
    # the seed's variant: random boxes with random real classes, weighted 0.01
    seed_cfg = TokenizerConfig(
        bins=64,
        max_instances=6,
        noise_duplicates=False,
        noise_shifted=False,
        noise_class="random",
        noise_coord_weight=0.01,
        noise_class_weight=0.01,
    )
    _, tgt, w = build_sequence(boxes, labels, v, seed_cfg, torch.Generator().manual_seed(0))
    noise = tgt[10:30].reshape(4, 5)
    assert bool(v.is_class(noise[:, 4]).all())
    assert torch.allclose(w[10:30], torch.full((20,), 0.01))


def test_input_dropout_keeps_token_types():
    v = Vocab(num_classes=5, bins=64)
    cfg = TokenizerConfig(bins=64, max_instances=10, input_dropout=0.5, class_corruption=False)
    boxes, labels = _boxes(10)
    inp, tgt, _ = build_sequence(boxes, labels, v, cfg, torch.Generator().manual_seed(0))
    objs = inp[1:].reshape(10, 5)
    assert bool(v.is_coord(objs[:, :4]).all()) and bool(v.is_class(objs[:, 4]).all())
    assert (inp[1:] != tgt[:-1]).float().mean() > 0.2


def test_truncated_normal_bounds():
    x = truncated_normal((20000,), 0.5, torch.Generator().manual_seed(0))
    assert x.abs().max() <= 1.0 + 1e-6 and abs(float(x.mean())) < 0.02


def test_tokens_to_detections_maps_back_to_original_pixels():
    v = Vocab(num_classes=3, bins=1000)
    # a 200x100 (h x w) image resized by 0.5 into a 128 canvas: box (10, 20, 60, 180) xyxy
    canvas, scale = 128, 0.5
    box = torch.tensor([[10.0, 20.0, 60.0, 180.0]])
    toks = v.quantize((box * scale / canvas)[:, [1, 0, 3, 2]]).reshape(-1)
    tokens = torch.cat([toks, torch.tensor([v.class_token_ids[2]])])[None]
    probs = torch.tensor([[[0.1, 0.2, 0.7]]])
    det = tokens_to_detections(tokens, probs, v, canvas, torch.tensor([scale]), torch.tensor([[200, 100]]))[0]
    assert int(det["labels"][0]) == 2 and float(det["scores"][0]) == pytest.approx(0.7)
    assert torch.allclose(det["boxes"], box, atol=canvas / scale / 999)
    # boxes are clipped to the image
    big = v.quantize(torch.tensor([0.0, 0.0, 1.0, 1.0]))
    tokens = torch.cat([big, torch.tensor([v.class_token_ids[0]])])[None]
    det = tokens_to_detections(tokens, probs, v, canvas, torch.tensor([scale]), torch.tensor([[200, 100]]))[0]
    assert det["boxes"].tolist() == [[0.0, 0.0, 100.0, 200.0]]


def test_tokens_to_detections_reads_fractional_coordinates():
    """``coords`` (the decoder's readout, in bins) replaces the tokens' own bins: sub-bin boxes."""
    v = Vocab(num_classes=3, bins=11)  # bin i <-> i / 10 of the canvas
    tokens = torch.tensor(
        [[v.coord_start + 1, v.coord_start + 2, v.coord_start + 5, v.coord_start + 6, v.class_token_ids[0]]]
    )
    probs = torch.tensor([[[0.9, 0.05, 0.05]]])
    args = (v, 100, torch.tensor([1.0]), torch.tensor([[100, 100]]))
    torch.testing.assert_close(
        tokens_to_detections(tokens, probs, *args)[0]["boxes"], torch.tensor([[20.0, 10.0, 60.0, 50.0]])
    )
    coords = torch.tensor([[[1.25, 2.5, 4.75, 6.0]]])  # ymin, xmin, ymax, xmax
    det = tokens_to_detections(tokens, probs, *args, coords=coords)[0]
    torch.testing.assert_close(det["boxes"], torch.tensor([[25.0, 12.5, 60.0, 47.5]]))


def test_raster_and_area_orders():
    v = Vocab(num_classes=5, bins=256)
    boxes, labels = _boxes(6)
    for how in ("raster", "area"):
        cfg = TokenizerConfig(
            bins=256, max_instances=10, augment_sequence=False, class_corruption=False, order=how
        )
        _, tgt, _ = build_sequence(boxes, labels, v, cfg, torch.Generator().manual_seed(0))
        b, _ = sequence_to_objects(tgt, v)
        if how == "raster":
            rows = torch.floor(b[:, 1] * 16)
            assert bool((rows[1:] >= rows[:-1]).all())
        else:
            area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            assert bool((area[1:] <= area[:-1] + 1e-6).all())


def test_class_weight_scales_only_real_class_tokens():
    v = Vocab(num_classes=5, bins=64)
    cfg = TokenizerConfig(bins=64, max_instances=6, class_weight=3.0, eos_weight=0.1)
    boxes, labels = _boxes(2)
    _, tgt, w = build_sequence(boxes, labels, v, cfg, torch.Generator().manual_seed(0))
    real = w[:10].reshape(2, 5)
    assert torch.equal(real[:, 4], torch.full((2,), 3.0)) and bool((real[:, :4] == 1).all())
    noise = w[10:30].reshape(4, 5)  # noise objects keep their own weights
    assert torch.equal(noise[:, 4], torch.full((4,), cfg.noise_class_weight))
    assert bool((noise[:, :4] == cfg.noise_coord_weight).all())


def _noise_extremes(extent: tuple[float, float] | None) -> tuple[float, float]:
    """The largest y and x any noise coordinate reaches over 20 samples (canvas fractions)."""
    v = Vocab(num_classes=5, bins=1000)
    cfg = TokenizerConfig(bins=1000, max_instances=40)
    boxes, labels = torch.tensor([[0.05, 0.1, 0.15, 0.3]]), torch.tensor([1])
    kwargs = {} if extent is None else {"extent": extent}
    y_max = x_max = 0.0
    for s in range(20):
        _, tgt, _ = build_sequence(boxes, labels, v, cfg, torch.Generator().manual_seed(s), **kwargs)
        objs = tgt[:-1].reshape(40, 5)
        yxyx = v.dequantize(objs[objs[:, 4] == NOISE][:, :4])
        y_max = max(y_max, float(yxyx[:, [0, 2]].max()))
        x_max = max(x_max, float(yxyx[:, [1, 3]].max()))
    return y_max, x_max


def test_noise_boxes_stay_inside_the_image_not_on_the_padding():
    """An image covering the top-left 0.5 x 0.25 of the canvas (h x w): noise objects are drawn inside
    it (the official code injects them before padding), and fill it rather than a corner of it."""
    y_max, x_max = _noise_extremes((0.5, 0.25))
    half_bin = 0.5 / 999
    assert y_max <= 0.5 + half_bin and x_max <= 0.25 + half_bin
    assert y_max > 0.45 and x_max > 0.22
    # without an extent the whole canvas is the image: the same draws then reach its far side
    y_full, x_full = _noise_extremes(None)
    assert y_full > 0.9 and x_full > 0.9


def test_duplicates_and_bad_noise_boxes_are_shuffled_together():
    """Official data_utils.augment_bbox shuffles bad and duplicate boxes as one block: a duplicate
    (IoU > 0.5 with the real box) must not always come before every bad box."""
    from torchvision.ops import box_iou

    real = torch.tensor([[0.40, 0.40, 0.60, 0.55]])
    interleaved = 0
    for s in range(30):
        nb = noise_boxes(real, 20, TokenizerConfig(), torch.Generator().manual_seed(s))
        assert nb.shape == (20, 4)
        is_dup = (box_iou(nb, real)[:, 0] > 0.5).long()
        # duplicates first would make is_dup non-increasing; shuffled, a bad box precedes a duplicate
        interleaved += int((is_dup[1:] > is_dup[:-1]).any())
    assert interleaved >= 20
