"""Image + box transforms onto the square padded canvas (torchvision.transforms.v2, tv_tensors).

Every transform maps ``(image uint8 (3,H,W), boxes float (N,4) xyxy original pixels, labels (N,))``
to a :class:`Sample` ``(canvas (3,S,S), boxes (N',4) xyxy canvas pixels, labels (N',), scale,
size)``: the image sits top-left on a canvas of side ``S = data.image_size`` and covers its
``size = (h, w)`` pixels (the rest is padding; see ``pad_value`` below). Boxes are clamped to the
image; those left without width or height (cropped away) are dropped with their labels, and only
those: the official ``filter_invalid_objects`` keeps every box with ``max > min`` on both axes
(data/transforms.py:268).

Recipes (``data.augment``):

- ``lsj``: the official large-scale jitter. A random scale ``s`` in [scale_min, scale_max]; the
  image is resized (aspect kept) to fit an ``s*S`` square, randomly cropped to at most ``S x S``,
  flipped with probability ``hflip`` and padded. The crop window is computed first and only that
  window is resized (``F.resized_crop``), so a 2x zoom costs no more than the output.
- ``detr``: the seed's recipe. Flip; with ``detr_crop``, half of the time DETR's random-size crop
  (a 384..600 px window of the image resized to a shorter side of 400/500/600, expressed in
  original pixels); then a shorter side drawn from ``detr_scales``, the longer side capped at S.
- ``none``: the evaluation transform.

Evaluation: the longer side is resized to S (aspect kept) and padded; ``scale = S / max(H, W)``,
so ``box_original = box_canvas / scale``.

Canvas pixels (``pad_value``, from ``model.pixels``): ``None`` (``imagenet``, this project's default)
keeps uint8 throughout and pads with 0. A float (``official``: 0.3) converts the image to float32
in [0, 1] first (``x / 255``), resizes in float (bilinear, antialiased) and pads with that value, as
the official code does (``convert_image_dtype``, ``tf.image.resize(antialias=True)``,
``pad_image_to_max_size``); the canvas is then float32 ``(3, S, S)``.

All randomness comes from the ``generator`` argument, so a sample is a pure function of its seed
(see :mod:`pix2seq.data.sampler`), whatever worker draws it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from pix2seq.config import DataConfig


class Sample(NamedTuple):
    """What a transform returns (see the module docstring)."""

    canvas: Tensor  # (3, S, S) uint8, or float32 in [0, 1] with a pad_value
    boxes: Tensor  # float (N, 4) xyxy canvas pixels
    labels: Tensor  # long (N,)
    scale: float  # canvas pixels per original pixel
    size: tuple[int, int]  # (h, w): the image's extent on the canvas, top-left; padding beyond


OFFICIAL_PAD_VALUE = 0.3  # the official pad_image_to_max_size's background, in [0, 1] pixels


def canvas_pad_value(pixels: str) -> float | None:
    """``model.pixels`` -> the transforms' ``pad_value``: None (uint8, zero padding) or 0.3 (float)."""
    return OFFICIAL_PAD_VALUE if pixels == "official" else None


def _to_canvas_pixels(image: Tensor, pad_value: float | None) -> Tensor:
    """uint8 input -> what the canvas holds: uint8 unchanged, or float32 in [0, 1]."""
    return image if pad_value is None else F.to_dtype(image, torch.float32, scale=True)


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    if high <= low:
        return low
    return int(torch.randint(low, high + 1, (), generator=generator))


def _choice(values: list, generator: torch.Generator | None):
    return values[_randint(0, len(values) - 1, generator)]


def _wrap(image: Tensor, boxes: Tensor) -> tuple[tv_tensors.Image, tv_tensors.BoundingBoxes]:
    h, w = image.shape[-2:]
    bb = tv_tensors.BoundingBoxes(boxes.float().reshape(-1, 4), format="XYXY", canvas_size=(h, w))
    return tv_tensors.Image(image), bb


def _crop_resize(
    image: Tensor, boxes: Tensor, top: int, left: int, height: int, width: int, out_h: int, out_w: int
):
    """Crop a window of the original (integer pixels) and resize it to (out_h, out_w), boxes alike."""
    img, bb = _wrap(image, boxes)
    if (top, left, height, width) == (0, 0, image.shape[-2], image.shape[-1]) and (out_h, out_w) == (
        height,
        width,
    ):
        return img, bb
    if (top, left, height, width) == (0, 0, image.shape[-2], image.shape[-1]):
        return F.resize(img, [out_h, out_w], antialias=True), F.resize(bb, [out_h, out_w])
    img = F.resized_crop(img, top, left, height, width, [out_h, out_w], antialias=True)
    bb = F.resized_crop(bb, top, left, height, width, [out_h, out_w])
    return img, bb


def _color_jitter(img: Tensor, strength: float, generator: torch.Generator | None) -> Tensor:
    """Brightness, contrast and saturation factors uniform in [1 - s, 1 + s], in a random order."""
    ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation]
    perm = torch.randperm(3, generator=generator).tolist()
    for i in perm:
        factor = max(0.0, 1.0 + strength * (2.0 * _rand(generator) - 1.0))
        img = ops[i](img, factor)
    return img


def _finish(
    img: Tensor,
    bb: tv_tensors.BoundingBoxes,
    labels: Tensor,
    size: int,
    scale: float,
    sanitize: bool = True,
    pad_value: float | None = None,
) -> Sample:
    """Pad top-left onto the canvas and drop boxes that no longer frame anything."""
    h, w = img.shape[-2:]
    assert h <= size and w <= size, (h, w, size)
    if pad_value is None:
        canvas = torch.zeros((3, size, size), dtype=torch.uint8)
    else:
        canvas = torch.full((3, size, size), pad_value, dtype=torch.float32)
    canvas[:, :h, :w] = img
    bb = tv_tensors.wrap(F.clamp_bounding_boxes(bb), like=bb, canvas_size=(size, size))
    boxes = bb.as_subclass(Tensor).float().reshape(-1, 4)
    if sanitize:
        # strictly positive extent: v2.SanitizeBoundingBoxes only has inclusive minimum sizes
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, labels = boxes[keep], labels[keep]
    return Sample(canvas, boxes, labels, float(scale), (h, w))


class EvalTransform:
    """Resize the longer side to ``size`` (aspect kept), pad; ``scale = size / max(H, W)``."""

    def __init__(self, size: int, pad_value: float | None = None):
        self.size, self.pad_value = size, pad_value

    def __call__(
        self, image: Tensor, boxes: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> Sample:
        H, W = image.shape[-2:]
        r = self.size / max(H, W)
        out_h, out_w = min(self.size, max(1, round(H * r))), min(self.size, max(1, round(W * r)))
        image = _to_canvas_pixels(image, self.pad_value)
        img, bb = _crop_resize(image, boxes, 0, 0, H, W, out_h, out_w)
        return _finish(img, bb, labels, self.size, r, sanitize=False, pad_value=self.pad_value)


class LargeScaleJitter:
    """The official recipe (see the module docstring)."""

    def __init__(
        self,
        size: int,
        scale_min: float,
        scale_max: float,
        hflip: float,
        color_jitter: float = 0.0,
        pad_value: float | None = None,
    ):
        self.size, self.scale_min, self.scale_max = size, scale_min, scale_max
        self.hflip, self.color_jitter, self.pad_value = hflip, color_jitter, pad_value

    def __call__(
        self, image: Tensor, boxes: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> Sample:
        S = self.size
        H, W = image.shape[-2:]
        s = self.scale_min + (self.scale_max - self.scale_min) * _rand(generator)
        r = s * S / max(H, W)  # fit the image into an (s*S)^2 square, aspect kept
        sh, sw = max(1, round(H * r)), max(1, round(W * r))
        ch, cw = min(sh, S), min(sw, S)
        oy, ox = _randint(0, sh - ch, generator), _randint(0, sw - cw, generator)
        # the window in original pixels (integers; the boxes follow the same rounding)
        top, left = min(H - 1, int(math.floor(oy / r))), min(W - 1, int(math.floor(ox / r)))
        height = max(1, min(H - top, round(ch / r)))
        width = max(1, min(W - left, round(cw / r)))
        image = _to_canvas_pixels(image, self.pad_value)
        img, bb = _crop_resize(image, boxes, top, left, height, width, ch, cw)
        if _rand(generator) < self.hflip:
            img, bb = F.horizontal_flip(img), F.horizontal_flip(bb)
        if self.color_jitter > 0:
            img = _color_jitter(img, self.color_jitter, generator)
        return _finish(img, bb, labels, S, r, pad_value=self.pad_value)


class DetrAugment:
    """The seed's DETR-style recipe (see the module docstring), scaled to the canvas."""

    CROP_SHORT_SIDES = (400, 500, 600)
    CROP_MIN, CROP_MAX = 384, 600

    def __init__(
        self,
        size: int,
        scales: list[int],
        hflip: float,
        crop: bool,
        color_jitter: float = 0.0,
        pad_value: float | None = None,
    ):
        self.size, self.scales, self.hflip, self.crop = size, list(scales), hflip, crop
        self.color_jitter, self.pad_value = color_jitter, pad_value

    def _crop_window(self, H: int, W: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
        f = _choice(list(self.CROP_SHORT_SIDES), generator) / min(H, W)  # DETR's intermediate resize
        rh, rw = H * f, W * f
        ch = (
            self.CROP_MIN + (min(self.CROP_MAX, rh) - self.CROP_MIN) * _rand(generator)
            if rh > self.CROP_MIN
            else rh
        )
        cw = (
            self.CROP_MIN + (min(self.CROP_MAX, rw) - self.CROP_MIN) * _rand(generator)
            if rw > self.CROP_MIN
            else rw
        )
        height, width = max(1, min(H, round(ch / f))), max(1, min(W, round(cw / f)))
        top, left = _randint(0, H - height, generator), _randint(0, W - width, generator)
        return top, left, height, width

    def __call__(
        self, image: Tensor, boxes: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> Sample:
        S = self.size
        H, W = image.shape[-2:]
        flip = _rand(generator) < self.hflip
        if self.crop and _rand(generator) < 0.5:
            top, left, height, width = self._crop_window(H, W, generator)
        else:
            top, left, height, width = 0, 0, H, W
        short = _choice(self.scales, generator)
        r = short / min(height, width)
        if max(height, width) * r > S:
            r = S / max(height, width)
        out_h, out_w = min(S, max(1, round(height * r))), min(S, max(1, round(width * r)))
        image = _to_canvas_pixels(image, self.pad_value)
        img, bb = _crop_resize(image, boxes, top, left, height, width, out_h, out_w)
        if flip:
            img, bb = F.horizontal_flip(img), F.horizontal_flip(bb)
        if self.color_jitter > 0:
            img = _color_jitter(img, self.color_jitter, generator)
        return _finish(img, bb, labels, S, r, pad_value=self.pad_value)


def eval_transform(image: Tensor, size: int, pad_value: float | None = None) -> tuple[Tensor, float]:
    """One raw image (uint8 (3, H, W)) -> (canvas (3, size, size), scale): the inference input."""
    out = EvalTransform(size, pad_value)(image, torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.long))
    return out.canvas, out.scale


def build_transform(dcfg: DataConfig, train: bool, pad_value: float | None = None):
    """The training recipe ``dcfg.augment`` (train=True) or the evaluation transform;
    ``pad_value``: the canvas's pixels (module docstring; :func:`canvas_pad_value`)."""
    S = dcfg.image_size
    if not train or dcfg.augment == "none":
        return EvalTransform(S, pad_value)
    if dcfg.augment == "lsj":
        return LargeScaleJitter(S, dcfg.scale_min, dcfg.scale_max, dcfg.hflip, dcfg.color_jitter, pad_value)
    if dcfg.augment == "detr":
        return DetrAugment(S, dcfg.detr_scales, dcfg.hflip, dcfg.detr_crop, dcfg.color_jitter, pad_value)
    raise ValueError(f"data.augment: unknown recipe {dcfg.augment!r}")
