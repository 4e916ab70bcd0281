"""Streamed data: the user's datasets (or the datasets behind their DataLoaders) read batch by
batch through `torch.utils.data.DataLoader` workers, for sets too large to hold in memory or
whose `__getitem__` transforms an image anew on every call.

A trial holds only the batches in flight, so its memory does not grow with the dataset. Every
training batch carries its samples' indices, by which a trial reads the teacher's outputs
cached on disk. The order of each epoch is fixed by the trial's seed and the epoch number, so a
resumed trial sees the epochs it has left in the order a fresh one would.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, default_collate

EVAL_BATCH = 256  # images per validation/test batch


class Indexed(Dataset):
    """The items of `dataset` as (image, label, index): a batch names the samples it holds."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x, y, i


class IndexedCollate:
    """The user's collate function (or torch's default) over (image, label) pairs, with the
    batch's indices appended as a tensor."""

    def __init__(self, collate: Optional[Callable] = None):
        self.collate = collate or default_collate

    def __call__(self, items):
        x, y = self.collate([(x, y) for x, y, _ in items])
        return x, y, torch.tensor([i for _, _, i in items])


def seed_rngs(seed: int) -> None:
    """numpy's and Python's global RNGs from `seed`, so a user's numpy or `random` transform
    repeats with the trial's seed (torch's is seeded by the trial and the loader)."""
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def seed_worker(worker_id: int) -> None:
    """A worker's numpy and Python RNGs from the seed torch gave it (derived from the loader's
    generator and the worker id)."""
    seed_rngs(torch.initial_seed())


@dataclass
class Stream:
    """The training set, the named validation sets and the test set, as map-style datasets of
    (image tensor, label), and how to load them: worker processes, batches prefetched by each,
    the user's collate function. `random` is whether `__getitem__` gave different images for
    the same index (a random transform): the teacher then runs live in the trials."""

    train: Dataset
    val: dict[str, Dataset]
    test: Dataset
    workers: int = 0
    prefetch: int = 2
    collate: Optional[Callable] = None
    random: bool = False

    def _loader(self, dataset: Dataset, batch_size: int, collate, device, generator=None, sampler=None) -> DataLoader:
        extra = {"prefetch_factor": self.prefetch, "persistent_workers": False} if self.workers else {}
        return DataLoader(dataset, batch_size=batch_size, shuffle=generator is not None and sampler is None,
                          sampler=sampler, generator=generator, num_workers=self.workers, collate_fn=collate,
                          worker_init_fn=seed_worker, pin_memory=torch.device(device).type == "cuda", **extra)

    def train_loader(self, batch_size: int, seed: int, epoch: int, device="cpu", rank: int = 0,
                     world: int = 1) -> DataLoader:
        """Shuffled batches of (images, labels, indices), in an order fixed by (seed, epoch). Of
        `world` data-parallel ranks, each reads its own disjoint share of one permutation of the
        epoch (DistributedSampler: the same seed on every rank, padded to equal shares)."""
        seed = seed * 1_000_003
        generator = torch.Generator().manual_seed(seed + epoch)
        sampler = None
        if world > 1:
            sampler = DistributedSampler(self.train, num_replicas=world, rank=rank, shuffle=True, seed=seed)
            sampler.set_epoch(epoch)
        return self._loader(Indexed(self.train), batch_size, IndexedCollate(self.collate), device, generator, sampler)

    def in_order(self, batch_size: int, device="cpu") -> DataLoader:
        """The training set in index order, (images, labels, indices): one pass of the teacher."""
        return self._loader(Indexed(self.train), batch_size, IndexedCollate(self.collate), device)

    def eval_loaders(self, split: str, batch_size: int = EVAL_BATCH, device="cpu") -> dict[str, DataLoader]:
        """The validation sets by name (`split="val"`), or {"test": ...}: DataLoaders of
        (images, labels) in a fixed order, the place an evaluation function is handed its data."""
        sets = self.val if split == "val" else {"test": self.test}
        return {name: self._loader(ds, batch_size, self.collate, device) for name, ds in sets.items()}


def subset(dataset: Dataset, indices) -> Dataset:
    return Subset(dataset, [int(i) for i in indices])


def class_count(dataset: Dataset) -> Optional[int]:
    """The number of classes a dataset declares (`classes`, as torchvision's have, or the
    labels in `targets`), looking through Subsets; None if it declares neither."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if getattr(dataset, "classes", None) is not None:
        return len(dataset.classes)
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets):
        return int(torch.as_tensor(targets).max()) + 1
    return None
