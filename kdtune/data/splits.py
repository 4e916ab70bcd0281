"""Normalised tensors split reproducibly into train / val / test, batched by index.

Data stays resident in memory (or on the trial's GPU) and batches are drawn by permuted
indices, so there is no DataLoader and every batch knows its dataset indices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kdtune.errors import DataError


@dataclass
class Splits:
    """Normalised tensors: train / val (held out of the training set) / test, and the
    normalisation applied (None for data given already normalised)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def map(self, fn) -> "Splits":
        """The same splits with `fn` applied to each of the six arrays (moved, converted)."""
        return Splits(fn(self.train_x), fn(self.train_y), fn(self.val_x), fn(self.val_y),
                      fn(self.test_x), fn(self.test_y), self.num_classes, self.mean, self.std)


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 N x C x H x W images to floats in [0, 1], then standardised per channel."""
    x = images.float().div_(255)
    return ((x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)).contiguous()


def split(train_x, train_y, test_x, test_y, val_size: int, seed: int, train_limit: Optional[int] = None,
          test_limit: Optional[int] = None, num_classes: Optional[int] = None, mean=None, std=None) -> Splits:
    """The first `train_limit` training examples, split by a seeded permutation into train and val."""
    train_idx, val_idx = split_indices(len(train_y), val_size, seed, train_limit)
    m = min(test_limit or len(test_y), len(test_y))
    classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    return Splits(train_x[train_idx], train_y[train_idx], train_x[val_idx], train_y[val_idx],
                  test_x[:m], test_y[:m], classes, mean, std)


def split_indices(total: int, val_size: int, seed: int, train_limit: Optional[int] = None):
    """(train indices, val indices), sorted: the first `train_limit` of `total` training examples
    split by a seeded permutation, the same for resident tensors and streamed datasets."""
    n = min(train_limit or total, total)
    if val_size >= n:
        raise DataError(f"data.val_size ({val_size}) must be below the number of training examples used ({n})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[val_size:].sort().values, order[:val_size].sort().values


def batches(n: int, batch_size: int, generator: torch.Generator, device="cpu", rank: int = 0, world: int = 1):
    """Index tensors of a seeded permutation of range(n), `batch_size` at a time.

    With `world` ranks, every rank draws the same permutation (the same seeded generator) and
    takes its own `batch_size` of each global batch of `batch_size x world`: the shards are
    disjoint, and all ranks take the same number of equal-sized steps, as DDP needs (the
    permutation is padded to a multiple of `world` with its first indices, as
    torch.utils.data.distributed.DistributedSampler pads, which shards a streamed dataset)."""
    order = torch.randperm(n, generator=generator)
    if world == 1:
        return order.to(device).split(batch_size)
    order = torch.cat([order, order[:-n % world]])
    return [chunk.tensor_split(world)[rank].to(device) for chunk in order.split(batch_size * world)]
