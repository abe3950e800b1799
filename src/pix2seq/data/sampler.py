"""Batch repetition (spec section 4) and per-sample seeds.

:class:`RepeatSampler` wraps a base sampler (``RandomSampler``, ``DistributedSampler``, ...) and
yields every index ``k`` times in a row, each time as ``(index, seed)``. The dataset builds one
``torch.Generator`` from that seed for the image augmentation, the object order and the sequence
noise, so

- the ``k`` copies of an image in a batch are augmented independently (different seeds);
- a sample depends only on ``(seed, epoch, rank, position, copy)``: the same run gives the same
  batches whatever the number of workers or which worker draws what, and ``set_epoch`` gives a
  new shuffle and new augmentations every epoch.

With a loader batch size of ``batch_size * k`` every batch holds ``batch_size`` distinct images,
``k`` copies each (groups never straddle batches because the batch size is a multiple of ``k``).

Call ``loader.sampler.set_epoch(epoch)`` (or :func:`set_epoch`) at the start of every epoch.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    data = struct.pack(f"<{len(values)}q", *(int(v) & 0x7FFFFFFFFFFFFFFF for v in values))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & 0x7FFFFFFFFFFFFFFF


class RepeatSampler(Sampler[tuple[int, int]]):
    """Yield each index of ``base`` ``repeat`` times consecutively, as ``(index, sample_seed)``.

    Args:
        base: any sampler of dataset indices; ``set_epoch`` is forwarded to it when it has one
            (``DistributedSampler``); a ``RandomSampler`` with a generator is reseeded per epoch.
        repeat: k >= 1.
        seed: the run's seed (``cfg.seed``).
    """

    def __init__(self, base: Sampler[int], repeat: int = 1, seed: int = 0):
        if repeat < 1:
            raise ValueError(f"train.batch_repeat: must be >= 1, got {repeat}")
        self.base = base
        self.repeat = repeat
        self.seed = seed
        self.epoch = 0
        self.rank = int(getattr(base, "rank", 0))
        self._skip = 0
        self.set_epoch(0)

    @property
    def skip(self) -> int:
        """Items the next pass leaves out at its start (mid-epoch resume): they are never loaded and
        the remaining ones get the same seeds as in an uninterrupted pass. Reset once a pass starts.
        ``len()`` stays the full epoch's length."""
        return self._skip

    @skip.setter
    def skip(self, n: int) -> None:
        self._skip = max(0, int(n))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(self.epoch)
        elif isinstance(self.base, RandomSampler) and self.base.generator is not None:
            self.base.generator.manual_seed(mix_seed(self.seed, self.epoch, 0x5EED))

    def __len__(self) -> int:
        return len(self.base) * self.repeat  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        skip, self._skip = self._skip, 0
        n = 0
        for pos, idx in enumerate(self.base):
            for copy in range(self.repeat):
                n += 1
                if n <= skip:
                    continue
                yield int(idx), mix_seed(self.seed, self.epoch, self.rank, pos, int(idx), copy)


class ShardSampler(Sampler[int]):
    """Evaluation sharding without padding: rank r gets indices r, r+R, r+2R, ... (disjoint, complete).

    Unlike ``DistributedSampler`` nothing is duplicated, so gathered predictions need no de-duplication;
    ranks may get one item fewer than others.
    """

    def __init__(self, num_items: int, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        self.num_items, self.num_replicas, self.rank = num_items, num_replicas, rank

    def __len__(self) -> int:
        return len(range(self.rank, self.num_items, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_items, self.num_replicas))


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Forward ``epoch`` to the loader's sampler (new shuffle and new augmentation seeds)."""
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    bs = getattr(loader, "batch_sampler", None)
    inner = getattr(bs, "sampler", None)
    if inner is not None and inner is not sampler and hasattr(inner, "set_epoch"):
        inner.set_epoch(epoch)


def sample_generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator for one sample (None: use the worker's global RNG)."""
    if seed is None:
        return None
    return torch.Generator().manual_seed(int(seed))
