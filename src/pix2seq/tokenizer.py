"""The detection task: boxes <-> token sequences (spec sections 2, 3 and 5).

Kept apart from the model, as in the official code: the model only sees token ids.

Training sequences (T = 5 * max_instances + 1)::

    input  = [PROMPT, y0 x0 y1 x1 c, ..., PAD ...]
    target = [y0 x0 y1 x1 c, ..., EOS, PAD ...]

Coordinates are normalised by the side of the square padded canvas before quantisation. Noise
objects are drawn inside the image's own extent on the canvas, not over the padding (as the official
code does: it injects them before padding, data/transforms.py ``inject_noise_bbox`` then
``pad_image_to_max_size``, configs/transform_configs.py:50-55).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import clip_boxes_to_image

from pix2seq.config import TokenizerConfig
from pix2seq.vocab import Vocab

TOKENS_PER_OBJECT = 5


def sequence_length(max_instances: int) -> int:
    """Length T of input and target sequences."""
    return TOKENS_PER_OBJECT * max_instances + 1


# --------------------------------------------------------------------------- random helpers


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    return torch.rand(shape, generator=generator)


def truncated_normal(shape: tuple[int, ...], std: float, generator: torch.Generator | None) -> Tensor:
    """N(0, std) truncated at two standard deviations (as tf.random.truncated_normal), by inverse CDF."""
    lo = 0.5 * (1.0 + math.erf(-2.0 / math.sqrt(2.0)))
    u = lo + (1.0 - 2.0 * lo) * _uniform(shape, generator)
    return std * math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)


def _randint(high: int, shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    return torch.randint(0, high, shape, generator=generator)


def _boxes_from_centre(cy: Tensor, cx: Tensor, h: Tensor, w: Tensor) -> Tensor:
    """(n,) centres and sizes -> (n, 4) xyxy, clipped to [0, 1]."""
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1).clamp(0.0, 1.0)


# ------------------------------------------------------------------------- sequence noise


def noise_boxes(
    real: Tensor, n_noise: int, tcfg: TokenizerConfig, generator: torch.Generator | None
) -> Tensor:
    """Fake objects for sequence augmentation (spec section 3).

    Everything is in the image's own frame: [0, 1] spans the image, not the padded canvas (see
    :func:`build_sequence`), so random centres and sizes follow the image as the official ones do.

    Args:
        real: (n, 4) xyxy in [0, 1], the real boxes of the sample (may be empty).
        n_noise: how many fake boxes to make.
    Returns:
        (n_noise, 4) xyxy in [0, 1]: duplicates of real boxes with truncated-normal jitter (their
        count uniform in 0..n_noise) and bad boxes, each 50/50 shifted or random, shuffled together
        (official data/data_utils.py:387-394), so the model cannot tell them apart by position.
    """
    if n_noise <= 0:
        return real.new_zeros((0, 4))
    parts: list[Tensor] = []
    n_real = real.shape[0]
    n_dup = 0
    if tcfg.noise_duplicates and n_real > 0:
        n_dup = int(_randint(n_noise + 1, (1,), generator))
        src = real[_randint(n_real, (n_dup,), generator)]
        wh = (src[:, 2:] - src[:, :2]).repeat(1, 2)  # (n_dup, 4): w h w h
        parts.append((src + wh * truncated_normal((n_dup, 4), tcfg.jitter_std, generator)).clamp(0.0, 1.0))
    n_bad = n_noise - n_dup
    can_shift = tcfg.noise_shifted and n_real > 0
    if n_bad > 0 and (can_shift or tcfg.noise_random):  # else: no bad kind is enabled
        if can_shift and tcfg.noise_random:
            shifted = _uniform((n_bad,), generator) < 0.5
        else:
            # only one kind is enabled: the bad boxes are all of it
            shifted = torch.full((n_bad,), can_shift)
        cy, cx = _uniform((n_bad,), generator), _uniform((n_bad,), generator)
        rand_hw = truncated_normal((n_bad, 2), 0.5, generator).abs()
        if n_real > 0:
            src = real[_randint(n_real, (n_bad,), generator)]
            shift_hw = torch.stack([src[:, 3] - src[:, 1], src[:, 2] - src[:, 0]], dim=-1)
            hw = torch.where(shifted[:, None], shift_hw, rand_hw)
        else:
            hw = rand_hw
        parts.append(_boxes_from_centre(cy, cx, hw[:, 0], hw[:, 1]))
    noise = torch.cat(parts) if parts else real.new_zeros((0, 4))
    return noise[torch.randperm(noise.shape[0], generator=generator)]


def _sort_corners(boxes: Tensor) -> Tensor:
    """Make x0 <= x1 and y0 <= y1 (jitter can swap them)."""
    x0 = torch.minimum(boxes[:, 0], boxes[:, 2])
    x1 = torch.maximum(boxes[:, 0], boxes[:, 2])
    y0 = torch.minimum(boxes[:, 1], boxes[:, 3])
    y1 = torch.maximum(boxes[:, 1], boxes[:, 3])
    return torch.stack([x0, y0, x1, y1], dim=-1)


# ------------------------------------------------------------------------ boxes -> tokens


def object_order(boxes01: Tensor, how: str, generator: torch.Generator | None) -> Tensor:
    """Indices (N,) putting (N, 4) xyxy boxes in the sequence order ``how`` (see TokenizerConfig.order)."""
    n = boxes01.shape[0]
    if how == "random":
        return torch.randperm(n, generator=generator)
    if how == "raster":
        # quantise ymin coarsely so objects on one "row" go left to right
        key = torch.floor(boxes01[:, 1] * 16) * 4 + boxes01[:, 0]
        return torch.argsort(key, stable=True)
    if how == "area":
        area = (boxes01[:, 2] - boxes01[:, 0]) * (boxes01[:, 3] - boxes01[:, 1])
        return torch.argsort(-area, stable=True)
    return torch.arange(n)


def objects_to_tokens(boxes01: Tensor, class_tokens: Tensor, vocab: Vocab) -> Tensor:
    """(n, 4) xyxy in [0, 1] and (n,) class tokens -> (5n,) ``y0 x0 y1 x1 c`` per object."""
    coords = vocab.quantize(boxes01[:, [1, 0, 3, 2]])  # (n, 4) in yxyx order
    return torch.cat([coords, class_tokens[:, None]], dim=1).reshape(-1)


def build_sequence(
    boxes01: Tensor,
    labels: Tensor,
    vocab: Vocab,
    tcfg: TokenizerConfig,
    generator: torch.Generator | None = None,
    train: bool = True,
    extent: tuple[float, float] = (1.0, 1.0),
) -> tuple[Tensor, Tensor, Tensor]:
    """One sample's training sequences.

    Args:
        boxes01: (N, 4) float xyxy normalised by the canvas side (values outside [0, 1] are clipped).
        labels: (N,) long contiguous labels in [0, num_classes).
        train: False disables every random part (order, noise, corruption, dropout) and keeps the
            annotation order.
        extent: (h, w) of the image on the canvas as fractions of the canvas side (the image sits
            top-left; padding beyond). Noise boxes are drawn inside it.
    Returns:
        input_tokens (T,) long, target_tokens (T,) long, token_weights (T,) float, T = 5*max_instances + 1.
    """
    m = tcfg.max_instances
    T = sequence_length(m)
    boxes01 = boxes01.float().reshape(-1, 4).clamp(0.0, 1.0)
    labels = labels.long().reshape(-1)
    order = object_order(boxes01, tcfg.order if train else "none", generator)[:m]
    real = boxes01[order]
    real_cls = vocab.label_to_token(labels[order])
    n = real.shape[0]

    w_real = torch.ones(n, TOKENS_PER_OBJECT)
    w_real[:, 4] = tcfg.class_weight
    weights_obj = [w_real]
    noise = real.new_zeros((0, 4))
    if train and tcfg.augment_sequence and n < m:
        # draw in the image's frame, then map back onto the canvas: no noise box on the padding
        wh = torch.tensor([extent[1], extent[0]] * 2)  # (4,) w h w h
        noise = noise_boxes((real / wh).clamp(0.0, 1.0), m - n, tcfg, generator) * wh
        noise = _sort_corners(noise)
    k = noise.shape[0]
    if tcfg.noise_class == "noise":
        noise_cls = torch.full((k,), vocab.noise, dtype=torch.long)
    else:  # the seed's variant: noise objects carry random real classes
        noise_cls = vocab.label_to_token(_randint(vocab.num_classes, (k,), generator))
    w_noise = torch.full((k, TOKENS_PER_OBJECT), tcfg.noise_coord_weight)
    w_noise[:, 4] = tcfg.noise_class_weight
    weights_obj.append(w_noise)

    all_boxes = torch.cat([real, noise])
    all_cls = torch.cat([real_cls, noise_cls])
    seq = objects_to_tokens(all_boxes, all_cls, vocab)  # (5K,)
    L = seq.shape[0]

    target = torch.full((T,), vocab.pad, dtype=torch.long)
    target[:L] = seq
    target[L] = vocab.eos  # L <= 5m = T - 1, so there is always room
    weights = torch.full((T,), tcfg.eos_weight)
    weights[:L] = torch.cat(weights_obj).reshape(-1)

    seq_in = seq.clone()
    if train and L > 0:
        is_cls = torch.zeros(L, dtype=torch.bool)
        is_cls[TOKENS_PER_OBJECT - 1 :: TOKENS_PER_OBJECT] = True
        if tcfg.class_corruption:
            # every input class token: 50% a random real class, 50% NOISE; targets keep the truth
            n_obj = L // TOKENS_PER_OBJECT
            rand_cls = vocab.label_to_token(_randint(vocab.num_classes, (n_obj,), generator))
            fake = torch.where(
                _uniform((n_obj,), generator) < 0.5, rand_cls, torch.full_like(rand_cls, vocab.noise)
            )
            seq_in[is_cls] = fake
        if tcfg.input_dropout > 0:
            drop = _uniform((L,), generator) < tcfg.input_dropout
            rand_coord = vocab.coord_start + _randint(vocab.bins, (L,), generator)
            rand_cls = vocab.label_to_token(_randint(vocab.num_classes, (L,), generator))
            seq_in = torch.where(drop, torch.where(is_cls, rand_cls, rand_coord), seq_in)
    inp = torch.full((T,), vocab.pad, dtype=torch.long)
    inp[0] = vocab.prompt
    inp[1 : L + 1] = seq_in
    return inp, target, weights


# ------------------------------------------------------------------------ tokens -> boxes


def sequence_to_objects(target_tokens: Tensor, vocab: Vocab) -> tuple[Tensor, Tensor]:
    """A target sequence (T,) -> its real objects: boxes (K, 4) xyxy in [0, 1], labels (K,).

    Reads 5-token groups until EOS; groups whose class is not a real class (NOISE) are skipped.
    """
    n = target_tokens.shape[0] // TOKENS_PER_OBJECT
    groups = target_tokens[: n * TOKENS_PER_OBJECT].reshape(n, TOKENS_PER_OBJECT)
    is_eos = (groups[:, 0] == vocab.eos).nonzero()
    if len(is_eos):
        groups = groups[: int(is_eos[0])]
    keep = vocab.is_class(groups[:, 4])
    groups = groups[keep]
    yxyx = vocab.dequantize(groups[:, :4])
    return yxyx[:, [1, 0, 3, 2]], vocab.token_to_label(groups[:, 4])


def tokens_to_detections(
    tokens: Tensor,
    class_probs: Tensor,
    vocab: Vocab,
    canvas_size: int,
    scale: Tensor,
    orig_size: Tensor,
    coords: Tensor | None = None,
) -> list[dict[str, Tensor]]:
    """Generated tokens -> per-image detections in original image pixels (spec section 5).

    Args:
        tokens: (B, 5M) generated tokens (without the prompt).
        class_probs: (B, M, C) probability of each real class at each object's class position.
        canvas_size: side S of the padded square canvas.
        scale: (B,) canvas pixels per original pixel.
        orig_size: (B, 2) original (height, width).
        coords: (B, M, 4) ymin, xmin, ymax, xmax in (fractional) bins, read out by the decoder
            (``GenerationOutput.coords``); None reads the coordinate tokens' own bins.
    Returns:
        B dicts with ``boxes`` (M, 4) xyxy, ``labels`` (M,) and ``scores`` (M,); every object is kept,
        ranked by score (NOISE predictions become low-scoring real classes).
    """
    B, L = tokens.shape
    M = L // TOKENS_PER_OBJECT
    groups = tokens[:, : M * TOKENS_PER_OBJECT].reshape(B, M, TOKENS_PER_OBJECT)
    if coords is None:
        yxyx = vocab.dequantize(groups[..., :4])
    else:
        yxyx = coords[:, :M].float() / (vocab.bins - 1)
    yxyx = yxyx * canvas_size  # (B, M, 4) canvas pixels
    boxes = yxyx[..., [1, 0, 3, 2]] / scale.reshape(B, 1, 1).to(yxyx)
    scores, labels = class_probs.float().max(dim=-1)  # (B, M)
    out = []
    for b in range(B):
        h, w = (int(v) for v in orig_size[b])
        bx = clip_boxes_to_image(_sort_corners(boxes[b]), (h, w))
        order = scores[b].argsort(descending=True)
        out.append({"boxes": bx[order], "labels": labels[b][order], "scores": scores[b][order]})
    return out
