"""Dataset, transforms and loaders: boxes follow the pixels, the data contract, batch repetition,
reproducible seeding and distributed sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler
from torchvision.io import encode_jpeg, encode_png

from pix2seq.config import DataConfig, PrepareConfig, config_from_dict
from pix2seq.data.dataset import (
    DetectionDataset,
    build_dataset,
    build_loader,
    build_vocab,
    collate,
    decode_image_file,
    load_manifest,
)
from pix2seq.data.prepare import prepare_dataset
from pix2seq.data.sampler import RepeatSampler, ShardSampler
from pix2seq.data.transforms import (
    OFFICIAL_PAD_VALUE,
    DetrAugment,
    EvalTransform,
    LargeScaleJitter,
    build_transform,
    canvas_pad_value,
    eval_transform,
)
from pix2seq.tokenizer import sequence_length
from pix2seq.vocab import NOISE

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning"
)

# ------------------------------------------------------------------ boxes stay on their pixels

H, W = 120, 160
RECT = (40, 30, 100, 80)  # x0, y0, x1, y1 of the red rectangle (channel 0)
CORNER = (136, 96, 158, 118)  # a green one near the bottom-right corner (channel 1): often cropped away


def _red_rectangle() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    img = torch.zeros(3, H, W, dtype=torch.uint8)
    for ch, (x0, y0, x1, y1) in enumerate((RECT, CORNER)):
        img[ch, y0:y1, x0:x1] = 255
    return img, torch.tensor([RECT, CORNER], dtype=torch.float32), torch.tensor([1, 2])


def _extent(canvas: torch.Tensor, channel: int = 0) -> tuple[float, float, float, float] | None:
    mask = canvas[channel] >= 128
    if not mask.any():
        return None
    ys, xs = mask.nonzero(as_tuple=True)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


_red_extent = _extent

S = 96
RECIPES = {
    "lsj": LargeScaleJitter(S, 0.3, 2.0, hflip=0.5),
    "detr": DetrAugment(S, [64, 72, 80, 88, 96], hflip=0.5, crop=True),
    "eval": EvalTransform(S),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_augmented_boxes_frame_the_coloured_pixels(recipe):
    """Flip, scale and crop move the boxes exactly with the pixels (within a pixel)."""
    t = RECIPES[recipe]
    img, boxes, labels = _red_rectangle()
    stats = {"kept": 0, "dropped": 0, "cut": 0, "flipped": 0}
    for seed in range(80):
        canvas, b, lab, scale, _ = t(img, boxes, labels, torch.Generator().manual_seed(seed))
        assert canvas.shape == (3, S, S) and canvas.dtype == torch.uint8
        assert b.dtype == torch.float32 and b.shape[1] == 4 and lab.shape == (b.shape[0],)
        assert (b >= 0).all() and (b <= S).all()
        for label, channel, rect in ((1, 0, RECT), (2, 1, CORNER)):
            extent = _extent(canvas, channel)
            rows = (lab == label).nonzero().flatten()
            if len(rows) == 0:  # cropped away (or to a sliver under a pixel): nothing visible remains
                stats["dropped"] += 1
                assert extent is None or min(extent[2] - extent[0], extent[3] - extent[1]) <= 1.5, (
                    seed,
                    extent,
                )
                continue
            box = b[rows[0]]
            stats["kept"] += 1
            assert extent is not None, f"{recipe} seed {seed}: box {box} but no coloured pixels"
            assert torch.allclose(box, torch.tensor(extent), atol=1.0), (
                f"{recipe} seed {seed}: {box} vs {extent}"
            )
            full_w, full_h = (rect[2] - rect[0]) * scale, (rect[3] - rect[1]) * scale
            stats["cut"] += int(box[2] - box[0] < full_w - 1 or box[3] - box[1] < full_h - 1)
            if label == 1:
                stats["flipped"] += int(
                    (box[0] + box[2]) / 2 > S / 2 and (rect[0] + rect[2]) / 2 * scale < W * scale / 2
                )
    assert stats["kept"] >= 80, stats
    if recipe == "eval":
        assert stats["dropped"] == stats["cut"] == stats["flipped"] == 0, stats
    else:  # the test saw flips, partial crops and boxes cropped away
        assert stats["flipped"] > 0 and stats["cut"] > 0 and stats["dropped"] > 0, stats


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_size_is_the_images_extent_on_the_canvas(recipe):
    """``size`` is exactly the part of the canvas the image covers (the tokenizer's noise region)."""
    img = torch.full((3, H, W), 255, dtype=torch.uint8)
    sizes = set()
    for seed in range(20):
        out = RECIPES[recipe](
            img, torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long), torch.Generator().manual_seed(seed)
        )
        h, w = out.size
        sizes.add((h, w))
        assert 1 <= h <= S and 1 <= w <= S
        assert (out.canvas[:, :h, :w] > 0).all()
        assert (out.canvas[:, h:, :] == 0).all() and (out.canvas[:, :, w:] == 0).all()
    if recipe != "eval":
        assert len(sizes) > 1


def test_lsj_scale_and_crop_ranges():
    img, boxes, labels = _red_rectangle()
    t = LargeScaleJitter(S, 0.3, 2.0, hflip=0.0)
    scales = []
    for seed in range(50):
        canvas, b, _, scale, _ = t(img, boxes, labels, torch.Generator().manual_seed(seed))
        scales.append(scale)
        content_w = int((canvas.sum(dim=(0, 1)) > 0).nonzero().max()) + 1 if canvas.any() else 0
        assert content_w <= S
    smin, smax = 0.3 * S / max(H, W), 2.0 * S / max(H, W)
    assert min(scales) >= smin - 1e-6 and max(scales) <= smax + 1e-6
    assert max(scales) > 1.5 * S / max(H, W) and min(scales) < 0.6 * S / max(H, W)


def test_detr_sizes():
    img, boxes, labels = _red_rectangle()
    t = DetrAugment(S, [48, 64], hflip=0.0, crop=False)
    for seed in range(10):
        canvas, b, _, scale, _ = t(img, boxes, labels, torch.Generator().manual_seed(seed))
        assert round(H * scale) in (48, 64)  # the shorter side is one of the scales
        assert torch.allclose(b, torch.tensor([RECT, CORNER], dtype=torch.float32) * scale, atol=1.0)
    # a scale larger than the canvas allows: the longer side is capped at S
    canvas, b, _, scale, _ = DetrAugment(S, [400], hflip=0.0, crop=False)(img, boxes, labels)
    assert scale == pytest.approx(S / W) and _red_extent(canvas)[2] <= S


def test_eval_transform_maps_back_to_original_pixels():
    img, boxes, labels = _red_rectangle()
    canvas, b, lab, scale, _ = EvalTransform(S)(img, boxes, labels)
    assert scale == pytest.approx(S / max(H, W))
    assert torch.allclose(b / scale, boxes, atol=0.5) and lab.tolist() == [1, 2]
    assert (canvas[:, round(H * scale) :, :] == 0).all()  # zero padding below the image
    c2, s2 = eval_transform(img, S)
    assert torch.equal(c2, canvas) and s2 == scale


@pytest.mark.parametrize("recipe", ["eval", "lsj", "detr"])
def test_official_pixels_give_a_float_canvas_padded_with_0_3(recipe):
    """model.pixels: official: the image as float32 x / 255, resized in float, padding 0.3; boxes and
    scale exactly as on the uint8 canvas."""
    assert canvas_pad_value("official") == OFFICIAL_PAD_VALUE and canvas_pad_value("imagenet") is None
    img, boxes, labels = _red_rectangle()
    img = img.clamp_min(1)  # nowhere black: the uint8 canvas' zeros are its padding
    make = {
        "eval": lambda pad: EvalTransform(S, pad),
        "lsj": lambda pad: LargeScaleJitter(S, 0.5, 0.9, hflip=0.5, pad_value=pad),
        "detr": lambda pad: DetrAugment(S, [64, 72], hflip=0.5, crop=True, pad_value=pad),
    }[recipe]
    u8, b8, l8, s8, z8 = make(None)(img, boxes, labels, torch.Generator().manual_seed(3))
    fl, bf, lf, sf, zf = make(OFFICIAL_PAD_VALUE)(img, boxes, labels, torch.Generator().manual_seed(3))
    assert u8.dtype == torch.uint8 and fl.dtype == torch.float32
    assert torch.equal(b8, bf) and torch.equal(l8, lf) and s8 == sf and z8 == zf
    pad = u8.sum(0) == 0
    assert pad.any() and bool((fl[:, pad] == torch.tensor(OFFICIAL_PAD_VALUE)).all())
    # inside the image the float canvas is the uint8 one before its rounding
    assert (fl[:, ~pad] * 255 - u8[:, ~pad].float()).abs().max() <= 1.0


@pytest.mark.parametrize("recipe", ["lsj", "detr"])
def test_training_transforms_drop_only_boxes_without_area(recipe):
    """A 0.4 px sliver stays (the official filter keeps max > min); a box off the image goes."""
    img = torch.zeros(3, S, S, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 10.0, 10.4, 30.0], [20.0, 20.0, 40.0, 40.0], [S + 5.0, 0.0, S + 9.0, 8.0]])
    t = LargeScaleJitter(S, 1.0, 1.0, hflip=0.0) if recipe == "lsj" else DetrAugment(S, [S], 0.0, crop=False)
    out = t(img, boxes, torch.tensor([0, 1, 2]))
    assert out.labels.tolist() == [0, 1]
    assert torch.allclose(out.boxes, boxes[:2], atol=1e-4)


def test_build_transform_recipes():
    d = DataConfig(image_size=64)
    assert isinstance(build_transform(d, True), LargeScaleJitter)
    assert isinstance(build_transform(d, False), EvalTransform)
    d.augment = "detr"
    assert isinstance(build_transform(d, True), DetrAugment)
    d.augment = "none"
    assert isinstance(build_transform(d, True), EvalTransform)


def test_color_jitter_keeps_padding_zero():
    img, boxes, labels = _red_rectangle()
    img[1:] = 60  # a grey-ish background so jitter has something to change
    t = LargeScaleJitter(S, 0.3, 0.5, hflip=0.0, color_jitter=0.4)
    canvas, *_ = t(img, boxes, labels, torch.Generator().manual_seed(0))
    assert (canvas[:, -1, :] == 0).all() and (canvas[:, :, -1] == 0).all()


def test_decode_png_and_jpeg(tmp_path):
    img = torch.randint(0, 255, (3, 20, 30), dtype=torch.uint8)
    (tmp_path / "a.png").write_bytes(bytes(encode_png(img).numpy()))
    (tmp_path / "b.jpg").write_bytes(bytes(encode_jpeg(img).numpy()))
    assert torch.equal(decode_image_file(tmp_path / "a.png"), img)
    assert decode_image_file(tmp_path / "b.jpg").shape == (3, 20, 30)
    gray = torch.randint(0, 255, (1, 20, 30), dtype=torch.uint8)
    (tmp_path / "g.jpg").write_bytes(bytes(encode_jpeg(gray).numpy()))
    assert decode_image_file(tmp_path / "g.jpg").shape == (3, 20, 30)  # always RGB


# ------------------------------------------------------------------------- dataset and loaders


@pytest.fixture(scope="module")
def prepared(tiny_generated, tmp_path_factory):
    root, _ = tiny_generated
    out = tmp_path_factory.mktemp("prepared")
    prepare_dataset(root, ["train2017", "val2017"], out, None, PrepareConfig(), workers=2, progress=False)
    return root, out


def _cfg(prepared, **over):
    root, out = prepared
    base = {
        "data": {"root": str(root), "prepared_dir": str(out), "image_size": 64, "num_workers": 0},
        "tokenizer": {"bins": 64, "max_instances": 5},
        "train": {"batch_size": 2, "batch_repeat": 3},
        "eval": {"batch_size": 5},
    }
    for k, v in over.items():
        section, key = k.split("__")
        base.setdefault(section, {})[key] = v
    return config_from_dict(base)


def test_items_follow_the_data_contract(prepared):
    cfg = _cfg(prepared)
    vocab = build_vocab(cfg)
    assert vocab.num_classes == 3
    ds = build_dataset(cfg, "train2017", train=True, vocab=vocab)
    item = ds[(0, 123)]
    T = sequence_length(5)
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.uint8
    assert item["boxes"].dtype == torch.float32 and item["boxes"].shape[1] == 4
    assert item["labels"].dtype == torch.long and item["labels"].shape == (item["boxes"].shape[0],)
    assert isinstance(item["image_id"], int) and item["image_id"] == int(ds.manifest.image_ids[0])
    assert item["orig_size"].tolist() == [64, 64] and item["orig_size"].dtype == torch.long
    assert isinstance(item["scale"], float)
    assert item["input_tokens"].shape == (T,) and item["target_tokens"].shape == (T,)
    assert item["token_weights"].shape == (T,) and item["token_weights"].dtype == torch.float32
    # a seeded item is a pure function of (index, seed)
    again = ds[(0, 123)]
    assert all(torch.equal(item[k], again[k]) for k in ("image", "boxes", "input_tokens", "target_tokens"))

    val = build_dataset(cfg, "val2017", train=False)
    v = val[0]
    assert "input_tokens" not in v and v["scale"] == pytest.approx(1.0)
    m = load_manifest(prepared[1] / "val2017.json")
    assert torch.allclose(v["boxes"], torch.from_numpy(m.targets(0)[0]))

    batch = collate([val[0], val[1], val[2]])
    assert batch["image"].shape == (3, 3, 64, 64) and batch["image_id"].shape == (3,)
    assert batch["orig_size"].shape == (3, 2) and batch["scale"].shape == (3,)
    assert isinstance(batch["boxes"], list) and len(batch["labels"]) == 3


def test_training_noise_objects_lie_on_the_image_not_the_padding(prepared):
    """LSJ at scale 0.3-0.5 leaves most of the canvas padding; every noise object stays on the image."""
    cfg = _cfg(
        prepared,
        data__scale_min=0.3,
        data__scale_max=0.5,
        data__image_size=64,
        tokenizer__bins=1000,
        tokenizer__max_instances=20,
    )
    vocab = build_vocab(cfg)
    ds = build_dataset(cfg, "train2017", train=True, vocab=vocab)
    n_noise = 0
    for i in range(len(ds)):
        item = ds[(i, 7)]
        h = int((item["image"].sum(dim=(0, 2)) > 0).nonzero().max()) + 1  # image rows (shapes on texture)
        w = int((item["image"].sum(dim=(0, 1)) > 0).nonzero().max()) + 1
        assert h <= 0.5 * 64 + 1 and w <= 0.5 * 64 + 1
        objs = item["target_tokens"][:-1].reshape(-1, 5)
        noise = objs[objs[:, 4] == NOISE]
        yxyx = vocab.dequantize(noise[:, :4]) * 64
        n_noise += len(noise)
        assert (yxyx[:, [0, 2]] <= h + 0.1).all() and (yxyx[:, [1, 3]] <= w + 0.1).all(), (i, h, w)
    assert n_noise > 10 * len(ds)


def test_training_skips_images_without_boxes_validation_keeps_them(prepared, tmp_path):
    """The official pipeline filters box-less examples in training only (data/coco.py:59-64)."""
    import json

    root, out = prepared
    for split in ("train2017", "val2017"):
        data = json.loads((out / f"{split}.json").read_text())
        data["boxes"][0] = data["boxes"][2] = []
        data["labels"][0] = data["labels"][2] = []
        (tmp_path / f"{split}.json").write_text(json.dumps(data))
    cfg = _cfg((root, tmp_path))
    vocab = build_vocab(cfg)
    full = load_manifest(out / "train2017.json")
    train = build_dataset(cfg, "train2017", train=True, vocab=vocab)
    kept = [k for k in range(len(full)) if k not in (0, 2)]
    assert train.manifest.image_ids.tolist() == full.image_ids[kept].tolist()
    for k, j in enumerate(kept):  # every remaining image keeps its own boxes and labels
        assert np.array_equal(train.manifest.targets(k)[0], full.targets(j)[0])
        assert np.array_equal(train.manifest.targets(k)[1], full.targets(j)[1])
    assert len(build_dataset(cfg, "val2017", train=False)) == len(load_manifest(out / "val2017.json"))
    # nothing left to train on: an empty training set (DetectionData.check_trainable names it)
    data = json.loads((out / "train2017.json").read_text())
    data["boxes"] = [[] for _ in data["boxes"]]
    data["labels"] = [[] for _ in data["labels"]]
    (tmp_path / "train2017.json").write_text(json.dumps(data))
    assert len(build_dataset(cfg, "train2017", train=True, vocab=vocab)) == 0


def test_batch_repetition_gives_k_different_copies(prepared):
    cfg = _cfg(prepared)
    vocab = build_vocab(cfg)
    loader = build_loader(cfg, "train2017", train=True, vocab=vocab)
    assert loader.batch_size == 6
    n_batches = 0
    for batch in loader:
        n_batches += 1
        ids = batch["image_id"].view(2, 3)
        assert (ids == ids[:, :1]).all() and ids[0, 0] != ids[1, 0]
        for g in range(2):
            copies = range(3 * g, 3 * g + 3)
            for a in copies:
                for b in copies:
                    if a < b:
                        same_pixels = torch.equal(batch["image"][a], batch["image"][b])
                        same_tokens = torch.equal(batch["input_tokens"][a], batch["input_tokens"][b])
                        assert not (same_pixels and same_tokens), "two copies are identical"
    assert n_batches == len(loader) == 24 // 2


def test_loader_is_reproducible_per_epoch_and_worker_independent(prepared):
    cfg = _cfg(prepared)
    vocab = build_vocab(cfg)

    def first_batches(loader, n=3):
        out = []
        for i, b in enumerate(loader):
            if i == n:
                break
            out.append(b)
        return out

    a = first_batches(build_loader(cfg, "train2017", train=True, vocab=vocab))
    b = first_batches(build_loader(cfg, "train2017", train=True, vocab=vocab, num_workers=2))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image_id"], y["image_id"]) and torch.equal(x["image"], y["image"])
        assert torch.equal(x["input_tokens"], y["input_tokens"])
    loader = build_loader(cfg, "train2017", train=True, vocab=vocab)
    loader.sampler.set_epoch(1)
    c = first_batches(loader)
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(a, c, strict=True))
    # mid-epoch resume: skipping a batch reproduces the rest exactly
    d = first_batches(build_loader(cfg, "train2017", train=True, vocab=vocab, skip_batches=1), n=2)
    for x, y in zip(a[1:], d, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["target_tokens"], y["target_tokens"])


def test_distributed_sampler_shards_disjointly_with_repetition(prepared):
    cfg = _cfg(prepared)
    vocab = build_vocab(cfg)
    seen = []
    for rank in range(2):
        loader = build_loader(
            cfg, "train2017", train=True, vocab=vocab, distributed=True, num_replicas=2, rank=rank
        )
        assert isinstance(loader.sampler.base, DistributedSampler)
        order = [idx for idx, _ in loader.sampler]
        assert len(order) == 12 * 3
        for i in range(0, len(order), 3):  # each index k times in a row
            assert order[i] == order[i + 1] == order[i + 2]
        seen.append(set(order))
        ids = torch.cat([b["image_id"] for b in loader])
        assert len(ids) == 36
    assert not (seen[0] & seen[1]) and len(seen[0] | seen[1]) == 24

    # the sampler on its own, with a plain DistributedSampler base and set_epoch
    ds = list(range(10))
    parts = []
    for rank in range(2):
        s = RepeatSampler(
            DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0), repeat=2, seed=0
        )
        s.set_epoch(3)
        items = list(s)
        assert len(items) == len(s) == 10
        assert [i for i, _ in items[::2]] == [i for i, _ in items[1::2]]
        assert all(items[j][1] != items[j + 1][1] for j in range(0, 10, 2))  # different seeds per copy
        parts.append({i for i, _ in items})
    assert not (parts[0] & parts[1]) and len(parts[0] | parts[1]) == 10


def test_eval_loader_and_sharding(prepared):
    cfg = _cfg(prepared)
    loader = build_loader(cfg, "val2017", train=False)
    ids = torch.cat([b["image_id"] for b in loader]).tolist()
    assert ids == [int(i) for i in load_manifest(prepared[1] / "val2017.json").image_ids]
    shards = [
        torch.cat(
            [
                b["image_id"]
                for b in build_loader(cfg, "val2017", False, distributed=True, num_replicas=3, rank=r)
            ]
        )
        for r in range(3)
    ]
    assert sorted(torch.cat(shards).tolist()) == sorted(ids)  # disjoint and complete, no padding
    assert list(ShardSampler(5, 2, 1)) == [1, 3]
    cfg = _cfg(prepared, data__max_val_images=3)
    assert len(build_dataset(cfg, "val2017", train=False)) == 3


def test_dataset_needs_vocab_for_training(prepared):
    with pytest.raises(ValueError, match="vocab"):
        DetectionDataset(prepared[1] / "train2017.json", EvalTransform(64), train=True)
