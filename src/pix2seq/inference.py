"""Detection on raw images from a trained model: the core of `pix2seq predict` and the pyfunc model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_image

from pix2seq.checkpoint import load_checkpoint
from pix2seq.config import config_from_dict
from pix2seq.data.transforms import eval_transform
from pix2seq.decoding import generate
from pix2seq.engine import autocast_dtype
from pix2seq.model import build_model
from pix2seq.tokenizer import tokens_to_detections
from pix2seq.vocab import Vocab


class ImageReadError(ValueError):
    """An input image could not be read or decoded; the message names it."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for, but CUDA is not available on this machine")
    return d


def read_image(source: str | os.PathLike[str] | bytes) -> torch.Tensor:
    """A file path or encoded bytes -> uint8 RGB (3, H, W); ImageReadError names what failed."""
    name = "<bytes>" if isinstance(source, bytes | bytearray) else str(source)
    try:
        if isinstance(source, bytes | bytearray):
            raw = torch.frombuffer(bytearray(source), dtype=torch.uint8)
        else:
            p = Path(source)
            if not p.is_file():
                raise ImageReadError(f"{name}: no such image file")
            raw = torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
        return decode_image(raw, mode=ImageReadMode.RGB)
    except ImageReadError:
        raise
    except Exception as e:  # torchvision raises RuntimeError for corrupt or unknown formats
        raise ImageReadError(f"{name}: cannot decode image ({e})") from None


class Predictor:
    """A trained Pix2Seq model, its vocabulary and category names, ready for raw images.

    Args:
        checkpoint: a training checkpoint or a slim ``model.pt`` (both hold config, vocab, categories).
        device: "auto", "cpu", "cuda", "cuda:1", ...
        overrides: ``key=value`` overrides of the stored config (e.g. ``eval.decoding=beam``).
    """

    def __init__(self, checkpoint: str | os.PathLike[str], device: str = "auto", overrides: list[str] | None = None):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: model checkpoint not found")
        ckpt = load_checkpoint(path, map_location="cpu")
        self.cfg = config_from_dict(ckpt["config"], overrides)
        self.vocab = Vocab(**ckpt["vocab"])
        self.categories: list[dict[str, Any]] = list(ckpt["categories"])
        self.device = resolve_device(device)
        self.model, _ = build_model(self.cfg, self.vocab)
        self.model.load_state_dict(ckpt["model"])
        self.model.to(self.device).eval()
        self.canvas = self.cfg.data.image_size

    @torch.inference_mode()
    def predict(self, images: list[torch.Tensor], score_threshold: float = 0.0, batch_size: int = 8) -> list[dict]:
        """uint8 (3, H, W) images -> per image {boxes (xyxy pixels), scores, labels, category_ids, names}."""
        out: list[dict] = []
        ecfg = self.cfg.eval
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            prepped = [eval_transform(img, self.canvas) for img in chunk]
            canvas = torch.stack([p[0] for p in prepped]).to(self.device)
            scale = torch.tensor([p[1] for p in prepped])
            orig = torch.tensor([[img.shape[1], img.shape[2]] for img in chunk])
            gen = generate(
                self.model, canvas, self.vocab, self.cfg.tokenizer.max_instances, method=ecfg.decoding,
                top_p=ecfg.top_p, temperature=ecfg.temperature, beam_size=ecfg.beam_size,
                constrained=ecfg.constrained, autocast_dtype=autocast_dtype(self.cfg.train.amp, self.device),
            )
            dets = tokens_to_detections(gen.tokens.cpu(), gen.class_probs.float().cpu(), self.vocab, self.canvas, scale, orig)
            for d in dets:
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
