"""Datasets as normalised tensors, prepared offline, split reproducibly.

Data stays resident in memory (or on the trial's GPU) and batches are drawn by permuted
indices, so there is no DataLoader and every batch knows its dataset indices.
"""
from __future__ import annotations

import gzip
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BUNDLED = Path(__file__).parent / "_data"


@dataclass(frozen=True)
class DatasetInfo:
    torchvision_name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    bundled: bool = False


DATASETS = {
    "mnist": DatasetInfo("MNIST", (0.1307,), (0.3081,), bundled=True),
    "fashion_mnist": DatasetInfo("FashionMNIST", (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("CIFAR100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DataError(Exception):
    """A dataset that cannot be found or read; the message says where the files go."""


def _unpack_idx(root: Path, folder: str) -> None:
    """Decompress `<file>.gz` (next to it, else the copy bundled with kdtune) into `<root>/<folder>/raw/`."""
    raw = root / folder / "raw"
    for name in IDX_FILES:
        target = raw / name
        if target.exists():
            continue
        source = next((p for p in (raw / f"{name}.gz", BUNDLED / folder / "raw" / f"{name}.gz") if p.exists()), None)
        if source is None:
            continue
        raw.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with gzip.open(source, "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        partial.replace(target)


def _torchvision(name: str, root: Path, train: bool):
    import torchvision

    info = DATASETS[name]
    cls = getattr(torchvision.datasets, info.torchvision_name)
    try:
        return cls(str(root), train=train, download=False)
    except RuntimeError:
        pass
    try:
        return cls(str(root), train=train, download=True)
    except Exception as exc:  # offline: any network or checksum failure
        files = ", ".join(IDX_FILES) if info.torchvision_name.endswith("MNIST") else "the dataset archive"
        raise DataError(
            f"{name}: not found under {root / info.torchvision_name}/raw and the download failed "
            f"({type(exc).__name__}). Put {files} (or their .gz) in {root / info.torchvision_name / 'raw'}/ "
            "and run again.") from None


def _as_tensors(ds, info: DatasetInfo) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.as_tensor(np.asarray(ds.data))
    if images.ndim == 3:
        images = images.unsqueeze(1)  # N x H x W -> N x 1 x H x W
    elif images.shape[-1] in (1, 3):
        images = images.permute(0, 3, 1, 2)  # CIFAR's N x H x W x C
    x = images.float().div_(255)
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)


@dataclass
class Splits:
    """Normalised tensors: train / val (held out of the training set) / test."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def map(self, fn) -> "Splits":
        """The same splits with `fn` applied to each of the six arrays (moved, converted)."""
        return Splits(fn(self.train_x), fn(self.train_y), fn(self.val_x), fn(self.val_y),
                      fn(self.test_x), fn(self.test_y), self.num_classes)


def load_splits(dataset: str, root: str | Path, val_size: int, seed: int,
                train_limit: int | None = None, test_limit: int | None = None) -> Splits:
    """The first `train_limit` training examples, split by a seeded permutation into train and val."""
    info = DATASETS[dataset]
    root = Path(root)
    if info.bundled:
        _unpack_idx(root, info.torchvision_name)
    train_x, train_y = _as_tensors(_torchvision(dataset, root, True), info)
    test_x, test_y = _as_tensors(_torchvision(dataset, root, False), info)
    n = min(train_limit or len(train_y), len(train_y))
    if val_size >= n:
        raise DataError(f"data.val_size ({val_size}) must be below the number of training examples used ({n})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train_idx, val_idx = order[val_size:].sort().values, order[:val_size].sort().values
    m = min(test_limit or len(test_y), len(test_y))
    return Splits(train_x[train_idx], train_y[train_idx], train_x[val_idx], train_y[val_idx],
                  test_x[:m], test_y[:m], int(max(train_y.max(), test_y.max())) + 1)


def batches(n: int, batch_size: int, generator: torch.Generator, device="cpu"):
    """Index tensors of a seeded permutation of range(n), `batch_size` at a time."""
    order = torch.randperm(n, generator=generator).to(device)
    return order.split(batch_size)
