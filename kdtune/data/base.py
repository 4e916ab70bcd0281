"""Built-in datasets: a registry of loaders returning raw tensors, and their normalisation."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

# (train images uint8 N x C x H x W, train labels int64, test images, test labels)
RawData = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    load: Callable[[Path, bool], RawData]  # (root, download) -> RawData; raises DataError
    num_classes: Optional[int] = None  # fixed by the dataset, so a subset missing a class keeps its width


DATASETS: dict[str, BuiltinDataset] = {}


def register_dataset(name: str, mean: tuple[float, ...], std: tuple[float, ...], num_classes: Optional[int] = None):
    """Register `load(root, download)` as the built-in dataset `name`."""
    def add(load):
        DATASETS[name] = BuiltinDataset(name, mean, std, load, num_classes)
        return load
    return add
