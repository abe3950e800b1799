"""What a training run needs from the data: loaders per epoch (resumable mid-epoch), categories,
the evaluation ground truth (built from the prepared validation manifest, see
:mod:`pix2seq.data.ground_truth`) and the manifests MLflow records as inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from pix2seq.config import Config
from pix2seq.data.dataset import build_dataset, build_loader, load_manifest
from pix2seq.data.ground_truth import coco_ground_truth
from pix2seq.data.prepare import ManifestError, manifest_path
from pix2seq.data.sampler import set_epoch
from pix2seq.vocab import Vocab


@dataclass
class DetectionData:
    cfg: Config
    distributed: bool
    vocab: Vocab
    categories: list[dict[str, Any]]
    train_manifest: Path
    val_manifest: Path
    _train: DataLoader | None = None
    _val: DataLoader | None = None
    _val_gt: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return f"{self.cfg.data.source}:{Path(self.cfg.data.root).name}"

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def label_to_category(self) -> list[int]:
        return [int(c["id"]) for c in self.categories]

    def _train_loader(self) -> DataLoader:
        if self._train is None:
            # Always a DistributedSampler (one replica on one process): N processes then see exactly
            # the samples one process would, split between them, whatever N is.
            from pix2seq import distributed as dist

            self._train = build_loader(
                self.cfg,
                self.cfg.data.train_split,
                train=True,
                vocab=self.vocab,
                distributed=True,
                num_replicas=dist.get_world_size(),
                rank=dist.get_rank(),
            )
        return self._train

    def check_trainable(self) -> None:
        """Fail, naming the manifest, when the training split cannot give a single optimizer step
        (no images, no boxes, fewer images than a step needs) instead of "training" 0 steps."""
        manifest = self._train_loader().dataset.manifest
        where = f"{self.train_manifest}: the training split {self.cfg.data.train_split!r}"
        if len(manifest) == 0 or len(manifest.boxes) == 0:
            raise ManifestError(
                f"{where} has {len(manifest)} images and {len(manifest.boxes)} boxes; nothing to train on"
            )
        t = self.cfg.train
        if self.train_batches_per_epoch() < t.accumulate:
            raise ManifestError(
                f"{where} has {len(manifest)} images: too few for one optimizer step of train.batch_size="
                f"{t.batch_size} x train.accumulate={t.accumulate} per process"
            )

    def train_batches_per_epoch(self) -> int:
        return len(self._train_loader())

    def train_loader(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        """The epoch's loader, starting after ``skip_batches`` batches (exact mid-epoch resume)."""
        loader = self._train_loader()
        set_epoch(loader, epoch)
        loader.sampler.skip = skip_batches * loader.batch_size
        return loader

    @property
    def val_annotations(self) -> dict[str, Any]:
        """The COCO ground truth of the prepared validation split (what prepare kept, clamped as it
        clamped; crowd/ignore regions flagged as in COCO), built on first use."""
        if self._val_gt is None:
            self._val_gt = coco_ground_truth(self.val_manifest)
        return self._val_gt

    def example_image(self) -> Path:
        """The first validation image's file (the served model's input example)."""
        m = load_manifest(self.val_manifest)
        return m.root / str(m.files[0])

    def val_loader(self, batch_size: int | None = None) -> DataLoader:
        """The validation loader (``eval.batch_size`` unless ``batch_size`` is given; a configured 0,
        "chosen for the device", is resolved by the caller: ``pix2seq.engine.eval_batch_size``)."""
        if self._val is None or (batch_size is not None and self._val.batch_size != batch_size):
            self._val = build_loader(
                self.cfg,
                self.cfg.data.val_split,
                train=False,
                distributed=self.distributed,
                batch_size=batch_size,
            )
        return self._val


def load_detection_data(cfg: Config, distributed: bool = False) -> DetectionData:
    d = cfg.data
    train_m = manifest_path(d.prepared_dir, d.train_split)
    val_m = manifest_path(d.prepared_dir, d.val_split)
    categories = build_dataset(cfg, d.val_split, train=False).categories
    t = cfg.tokenizer
    vocab = Vocab.for_categories(categories, t.bins, t.vocab_size, t.vocab)
    return DetectionData(
        cfg=cfg,
        distributed=distributed,
        vocab=vocab,
        categories=categories,
        train_manifest=train_m,
        val_manifest=val_m,
    )
