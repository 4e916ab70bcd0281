"""ImageNet (or any image folder in its layout) as torchvision's `ImageFolder`, streamed with the
standard transforms: `root/train/<class>/*` and `root/val/<class>/*` (the validation images
sorted into class folders, as torchvision's ImageNet example expects).

    data: {dataset: kdtune.data.imagefolder:imagenet, kwargs: {size: 224}}

kdtune's validation split is held out of `train/` (`val_per_class` images of each class, read
with the evaluation transform) and `val/` is the test set, so the published validation accuracy
is the sweep's `test_acc`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from kdtune.errors import DataError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as torchvision's weights use


def transforms(size: int):
    """(train, eval) transforms: RandomResizedCrop + horizontal flip, and Resize to size * 8/7
    (256 for 224) + CenterCrop; both end normalised."""
    from torchvision.transforms import v2

    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    train = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *tail])
    evaluate = v2.Compose([v2.Resize(round(size * 8 / 7), antialias=True), v2.CenterCrop(size), *tail])
    return train, evaluate


def held_out(targets: list[int], per_class: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices): `per_class` images of each class, drawn by `seed`."""
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed)).tolist()
    taken: dict[int, int] = {}
    val = []
    for i in order:
        if taken.get(targets[i], 0) < per_class:
            taken[targets[i]] = taken.get(targets[i], 0) + 1
            val.append(i)
    chosen = set(val)
    return [i for i in range(len(targets)) if i not in chosen], sorted(val)


def imagenet(root: str, size: int = 224, val_per_class: int = 50, seed: int = 0) -> dict[str, DataLoader]:
    """DataLoaders of `root/train` (train and held-out validation) and `root/val` (test) for kdtune
    to stream; it rebatches them with `train.batch_size` and its own workers."""
    from torchvision.datasets import ImageFolder

    folders = {part: Path(root) / part for part in ("train", "val")}
    missing = [str(f) for f in folders.values() if not f.is_dir()]
    if missing:
        raise DataError(f"imagenet: no class folders in {', '.join(missing)} (expected ROOT/train/<class>/ and "
                        "ROOT/val/<class>/)")
    train_tf, eval_tf = transforms(size)
    train = ImageFolder(str(folders["train"]), train_tf)
    train_idx, val_idx = held_out(train.targets, val_per_class, seed)
    val = Subset(ImageFolder(str(folders["train"]), eval_tf), val_idx)
    return {"train": DataLoader(Subset(train, train_idx)), "val": DataLoader(val),
            "test": DataLoader(ImageFolder(str(folders["val"]), eval_tf))}
