"""Detection on raw images from a trained model: the core of `pix2seq predict` and the pyfunc model."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_image

from pix2seq.checkpoint import MODEL_ENTRIES, config_from_checkpoint, load_checkpoint
from pix2seq.data.transforms import canvas_pad_value, eval_transform
from pix2seq.detect import detect
from pix2seq.engine import eval_batch_size
from pix2seq.errors import Pix2SeqError
from pix2seq.files import FileReadError, read_regular
from pix2seq.model import build_model
from pix2seq.precision import choose as choose_precision
from pix2seq.vocab import Vocab


class ImageReadError(Pix2SeqError, ValueError):
    """An input image could not be read or decoded; the message names it."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for, but CUDA is not available on this machine")
    return d


def read_image(source: str | os.PathLike[str] | bytes) -> torch.Tensor:
    """A file path or encoded bytes -> uint8 RGB (3, H, W); ImageReadError names what failed.

    JPEG, PNG (8 or 16 bit), WebP and GIF (first frame) through torchvision, other formats Pillow
    reads (BMP, TIFF, ...) through Pillow; the EXIF orientation is applied, so boxes refer to the
    image as viewers show it.
    """
    name = "<bytes>" if isinstance(source, bytes | bytearray) else str(source)
    if isinstance(source, bytes | bytearray):
        data = bytes(source)
    else:
        try:  # regular files only: a FIFO or device given as an image is refused, never read
            data = read_regular(source, allow_empty=True)
        except FileReadError as e:
            raise ImageReadError(str(e)) from None
    if not data:
        raise ImageReadError(f"{name}: empty file")
    try:
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        img = decode_image(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except Exception as e:  # torchvision raises RuntimeError for corrupt or unknown formats
        img = _read_with_pillow(data)
        if img is None:
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            first = re.sub(r"^\w+, \S+\.cpp:\d+, ", "", first)  # torchvision's C++ source location
            if first.startswith("Unsupported image file"):  # and Pillow did not know it either
                first = "not a JPEG, PNG, WebP, GIF or other format Pillow reads"
            raise ImageReadError(f"{name}: cannot decode image ({first})") from None
    if img.ndim == 4:  # animated GIF: (frames, 3, H, W)
        img = img[0]
    if img.dtype == torch.uint16:  # 16-bit PNG
        img = (img.to(torch.int32) >> 8).to(torch.uint8)
    elif img.dtype != torch.uint8:
        raise ImageReadError(f"{name}: unsupported pixel type {img.dtype}")
    if img.shape[-1] < 1 or img.shape[-2] < 1:
        raise ImageReadError(f"{name}: empty image ({img.shape[-2]}x{img.shape[-1]})")
    return img.contiguous()


def _read_with_pillow(data: bytes) -> torch.Tensor | None:
    """Formats torchvision cannot decode; None when Pillow cannot either."""
    import io

    import numpy as np
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            arr = np.array(im, dtype=np.uint8)
    except Exception:  # noqa: BLE001 - PIL raises many types for bad files
        return None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _inference_build_config(cfg):
    """``cfg`` for building the network whose weights a checkpoint then fills: never fetch ImageNet
    weights (that needs the network, and they are overwritten anyway), same normalisation layers."""
    import copy

    if not cfg.model.pretrained:
        return cfg
    out = copy.deepcopy(cfg)
    if out.model.backbone_norm == "auto":
        out.model.backbone_norm = "frozen"  # what "auto" means with pretrained weights
    out.model.pretrained = False
    return out


class Predictor:
    """A trained Pix2Seq model, its vocabulary and category names, ready for raw images.

    Args:
        checkpoint: a training checkpoint or a slim ``model.pt`` (both hold config, vocab, categories).
        device: "auto", "cpu", "cuda", "cuda:1", ...
        overrides: ``key=value`` overrides of the stored config (e.g. ``eval.decoding=beam``).
    """

    def __init__(
        self, checkpoint: str | os.PathLike[str], device: str = "auto", overrides: list[str] | None = None
    ):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: model checkpoint not found")
        ckpt = load_checkpoint(path, map_location="cpu", required=MODEL_ENTRIES)
        self.cfg = config_from_checkpoint(ckpt, path, overrides)
        self.vocab = Vocab(**ckpt["vocab"])
        self.categories: list[dict[str, Any]] = list(ckpt["categories"])
        self.device = resolve_device(device)
        self.model, _ = build_model(_inference_build_config(self.cfg), self.vocab)
        self.model.load_state_dict(ckpt["model"])
        self.model.to(self.device).eval()
        self.precision = choose_precision(self.cfg.train.amp, self.device)
        if self.precision.channels_last:
            self.model.to(memory_format=torch.channels_last)  # the encoder's convolutions run faster
        self.canvas = self.cfg.data.image_size
        self.batch_size = eval_batch_size(self.cfg.eval.batch_size, self.device, self.canvas)

    @torch.inference_mode()
    def predict(
        self, images: list[torch.Tensor], score_threshold: float = 0.0, batch_size: int | None = None
    ) -> list[dict]:
        """uint8 (3, H, W) images -> per image {boxes (xyxy pixels), scores, labels, category_ids, names}.

        ``batch_size``: images decoded together (default: ``eval.batch_size``, or chosen for the device).
        """
        out: list[dict] = []
        batch_size = batch_size or self.batch_size
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            pad = canvas_pad_value(self.cfg.model.pixels)
            prepped = [eval_transform(img, self.canvas, pad) for img in chunk]
            canvas = torch.stack([p[0] for p in prepped]).to(self.device)
            scale = torch.tensor([p[1] for p in prepped])
            orig = torch.tensor([[img.shape[1], img.shape[2]] for img in chunk])
            for d in detect(self.model, canvas, self.vocab, self.cfg, scale, orig, self.precision):
                keep = d["scores"] >= score_threshold
                labels = d["labels"][keep].tolist()
                out.append(
                    {
                        "boxes": d["boxes"][keep].tolist(),
                        "scores": d["scores"][keep].tolist(),
                        "labels": labels,
                        "category_ids": [int(self.categories[lab]["id"]) for lab in labels],
                        "names": [str(self.categories[lab]["name"]) for lab in labels],
                    }
                )
        return out
