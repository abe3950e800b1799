"""Dataset over a prepared manifest, ``collate`` and the loader factories.

Items follow the data contract of docs/architecture.md::

    image          uint8 (3, S, S)   the canvas; image top-left, zero padding right/bottom
                   (model.pixels: official: float32 in [0, 1], padding 0.3)
    boxes          float (N, 4)      xyxy canvas pixels, after augmentation
    labels         long (N,)         contiguous labels 0..C-1
    image_id       int               the COCO image id
    orig_size      long (2,)         original (height, width)
    scale          float             canvas pixels per original pixel
    input_tokens, target_tokens (T,) long, token_weights (T,) float     training only

The manifest is held in flat numpy arrays (no per-image Python objects), so forked workers share
it instead of copying it page by page as reference counts change.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from pix2seq.config import Config, TokenizerConfig
from pix2seq.data.prepare import manifest_path, read_manifest_json
from pix2seq.data.sampler import RepeatSampler, ShardSampler, sample_generator
from pix2seq.data.transforms import build_transform, canvas_pad_value
from pix2seq.tokenizer import build_sequence
from pix2seq.vocab import Vocab

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec (not a dependency here); they
# still work and are the fast path, so the per-call DeprecationWarning is silenced for them only.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision",
    category=DeprecationWarning,
)

# ------------------------------------------------------------------------------------ manifest


@dataclass
class Manifest:
    """A prepared split: flat arrays, image ``i``'s boxes are ``boxes[offsets[i]:offsets[i+1]]``."""

    split: str
    root: Path
    categories: list[dict[str, Any]]
    image_ids: np.ndarray  # (n,) int64
    files: np.ndarray  # (n,) str, relative to root
    sizes: np.ndarray  # (n, 2) int64 (height, width)
    boxes: np.ndarray  # (M, 4) float32 xyxy original pixels
    labels: np.ndarray  # (M,) int64
    offsets: np.ndarray  # (n + 1,) int64

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def targets(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.boxes[a:b], self.labels[a:b]

    def with_objects(self) -> Manifest:
        """The images that have at least one box (boxes and labels are shared, not copied)."""
        counts = np.diff(self.offsets)
        keep = counts > 0
        if keep.all():
            return self
        offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
        np.cumsum(counts[keep], out=offsets[1:])
        return Manifest(
            self.split, self.root, self.categories, self.image_ids[keep], self.files[keep], self.sizes[keep],
            self.boxes, self.labels, offsets,
        )  # fmt: skip

    def subset(self, n: int) -> Manifest:
        """The first ``n`` images (``n <= 0``: all)."""
        if n <= 0 or n >= len(self):
            return self
        end = int(self.offsets[n])
        return Manifest(
            self.split, self.root, self.categories, self.image_ids[:n], self.files[:n], self.sizes[:n],
            self.boxes[:end], self.labels[:end], self.offsets[: n + 1],
        )  # fmt: skip


def load_manifest(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Manifest:
    """Read a manifest written by the prepare stage; ``root`` overrides the dataset root it names."""
    path = Path(path)
    data = read_manifest_json(path)
    images = data["images"]
    n = len(images)
    counts = np.fromiter((len(b) for b in data["boxes"]), dtype=np.int64, count=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    flat_boxes = [b for per in data["boxes"] for b in per]
    flat_labels = [lab for per in data["labels"] for lab in per]
    boxes = np.asarray(flat_boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(flat_labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(boxes):
        raise ValueError(f"{path}: boxes and labels disagree")
    return Manifest(
        split=data.get("split", path.stem),
        root=Path(root if root is not None else data["root"]),
        categories=list(data["categories"]),
        image_ids=np.asarray([im[0] for im in images], dtype=np.int64),
        files=np.asarray([im[1] for im in images], dtype=np.str_),
        sizes=np.asarray([[im[3], im[2]] for im in images], dtype=np.int64).reshape(-1, 2),
        boxes=boxes,
        labels=labels,
        offsets=offsets,
    )


def read_categories(cfg: Config, split: str | None = None) -> list[dict[str, Any]]:
    """The category list (label = position) of the prepared ``split`` (default: the train split)."""
    p = manifest_path(cfg.data.prepared_dir, split or cfg.data.train_split)
    with open(p) as f:
        return list(json.load(f)["categories"])


def build_vocab(cfg: Config) -> Vocab:
    """The vocabulary for the prepared dataset's categories and ``tokenizer.*``."""
    t = cfg.tokenizer
    return Vocab.for_categories(read_categories(cfg), t.bins, t.vocab_size, t.vocab)


# -------------------------------------------------------------------------------------- images


def decode_image_file(path: str | os.PathLike[str]) -> Tensor:
    """uint8 (3, H, W) RGB; JPEGs through ``decode_jpeg`` on the file bytes, others ``decode_image``."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:  # torch.frombuffer would say "buffer length (0)"
        raise ValueError(f"{path}: empty file (0 bytes)")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if data.numel() >= 3 and data[0] == 0xFF and data[1] == 0xD8:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # unusual JPEG flavours: let the generic decoder try
    return decode_image(data, mode=ImageReadMode.RGB)


# ------------------------------------------------------------------------------------- dataset


class DetectionDataset(Dataset):
    """Items of a prepared split on the canvas; training items carry token sequences.

    ``dataset[i]`` uses the worker's global RNG; ``dataset[(i, seed)]`` (what :class:`RepeatSampler`
    yields) is a pure function of ``(i, seed)``.
    """

    def __init__(
        self,
        manifest: Manifest | str | os.PathLike[str],
        transform,
        train: bool,
        vocab: Vocab | None = None,
        tcfg: TokenizerConfig | None = None,
        image_size: int | None = None,
    ):
        self.manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        self.transform = transform
        self.train = train
        self.vocab = vocab
        self.tcfg = tcfg
        self.image_size = image_size or transform.size
        if train and (vocab is None or tcfg is None):
            raise ValueError("a training dataset needs vocab and tcfg to build token sequences")
        if vocab is not None and vocab.num_classes < self.manifest.num_classes:
            raise ValueError(
                f"vocab has {vocab.num_classes} classes but {self.manifest.split} has {self.manifest.num_classes} categories"
            )

    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def categories(self) -> list[dict[str, Any]]:
        return self.manifest.categories

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, tuple | list):
            index, seed = int(key[0]), int(key[1])
        else:
            index, seed = int(key), None
        g = sample_generator(seed)
        m = self.manifest
        image = decode_image_file(m.root / str(m.files[index]))
        boxes_np, labels_np = m.targets(index)
        boxes = torch.from_numpy(boxes_np.copy())
        labels = torch.from_numpy(labels_np.copy())
        orig_size = torch.tensor(image.shape[-2:], dtype=torch.long)
        out = self.transform(image, boxes, labels, g)
        item: dict[str, Any] = {
            "image": out.canvas,
            "boxes": out.boxes,
            "labels": out.labels,
            "image_id": int(m.image_ids[index]),
            "orig_size": orig_size,
            "scale": out.scale,
        }
        if self.train:
            S = self.image_size
            extent = (out.size[0] / S, out.size[1] / S)
            inp, tgt, w = build_sequence(out.boxes / S, out.labels, self.vocab, self.tcfg, g, extent=extent)
            item.update(input_tokens=inp, target_tokens=tgt, token_weights=w)
        return item


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of items into the batch dict of the data contract (boxes/labels stay lists)."""
    out: dict[str, Any] = {
        "image": torch.stack([b["image"] for b in batch]),
        "boxes": [b["boxes"] for b in batch],
        "labels": [b["labels"] for b in batch],
        "image_id": torch.tensor([b["image_id"] for b in batch], dtype=torch.long),
        "orig_size": torch.stack([b["orig_size"] for b in batch]),
        "scale": torch.tensor([b["scale"] for b in batch], dtype=torch.float32),
    }
    if "input_tokens" in batch[0]:
        for k in ("input_tokens", "target_tokens", "token_weights"):
            out[k] = torch.stack([b[k] for b in batch])
    return out


# ------------------------------------------------------------------------------------ factories


def build_dataset(cfg: Config, split: str, train: bool, vocab: Vocab | None = None) -> DetectionDataset:
    """The dataset of a prepared ``split`` with the configured recipe (train) or eval transform.

    Training skips images without boxes, as the official code does (data/coco.py:59-64: examples
    with no instance are filtered out in training only); evaluation keeps every image.
    """
    manifest = load_manifest(manifest_path(cfg.data.prepared_dir, split))
    if train:
        manifest = manifest.with_objects()  # none left: DetectionData.check_trainable says so
    elif cfg.data.max_val_images > 0:
        manifest = manifest.subset(cfg.data.max_val_images)
    return DetectionDataset(
        manifest,
        build_transform(cfg.data, train, canvas_pad_value(cfg.model.pixels)),
        train=train,
        vocab=vocab,
        tcfg=cfg.tokenizer if train else None,
        image_size=cfg.data.image_size,
    )


def _dist_info(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is not None and rank is not None:
        return num_replicas, rank
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))


def build_loader(
    cfg: Config,
    split: str,
    train: bool,
    vocab: Vocab | None = None,
    distributed: bool = False,
    *,
    dataset: DetectionDataset | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    num_replicas: int | None = None,
    rank: int | None = None,
    epoch: int = 0,
    skip_batches: int = 0,
) -> DataLoader:
    """A DataLoader over the prepared ``split``.

    Training: shuffled (``RandomSampler``, or ``DistributedSampler`` when ``distributed``), each index
    repeated ``train.batch_repeat`` times by :class:`RepeatSampler`; batch size
    ``train.batch_size * batch_repeat`` (the distinct images per process times k); incomplete last
    batches are dropped. ``epoch`` seeds the first pass; call ``loader.sampler.set_epoch(epoch)``
    before every later one. ``skip_batches`` starts the first pass after that many batches (resume
    mid-epoch) without loading them; the rest is identical to an uninterrupted epoch.

    Evaluation: in order, ``eval.batch_size``; distributed evaluation shards without padding
    (:class:`ShardSampler`), so every image is evaluated exactly once over all ranks.
    """
    ds = dataset if dataset is not None else build_dataset(cfg, split, train, vocab)
    workers = cfg.data.num_workers if num_workers is None else num_workers
    generator = torch.Generator().manual_seed(cfg.seed)
    if train:
        k = cfg.train.batch_repeat
        per_step = batch_size if batch_size is not None else cfg.train.batch_size
        if distributed:
            world, r = _dist_info(num_replicas, rank)
            base = DistributedSampler(
                ds, num_replicas=world, rank=r, shuffle=True, seed=cfg.seed, drop_last=True
            )
        else:
            base = RandomSampler(ds, generator=torch.Generator())
        sampler = RepeatSampler(base, k, seed=cfg.seed)
        bs = per_step * k
        sampler.set_epoch(epoch)
        if skip_batches:
            sampler.skip = skip_batches * bs
        drop_last = len(base) >= per_step
    else:
        if distributed:
            world, r = _dist_info(num_replicas, rank)
            sampler = ShardSampler(len(ds), world, r)
        else:
            sampler = SequentialSampler(ds)
        bs = batch_size if batch_size is not None else cfg.eval.batch_size
        drop_last = False
    return DataLoader(
        ds,
        batch_size=bs,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=generator,
    )
