"""CIFAR-10 and CIFAR-100 through torchvision's classes, from any copy in the standard pickle layout.

torchvision refuses a copy whose files lack the official MD5s, so a user's subset, a re-pickled
copy or the tests' small files would not load. kdtune compares the checksums itself, warns naming
the files that differ, and reads the copy through torchvision's class with the comparison left out.

Normalisation uses the per-channel mean and std over all pixels of the official training images:
for CIFAR-100 the constants RepDistiller and mdistiller use; for CIFAR-10 the true std (0.247,
0.243, 0.261), not the often copied (0.2023, 0.1994, 0.2010). They are fixed rather than computed
from the copy loaded, so a subset is normalised like the full set a checkpoint was trained on.
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from kdtune.data.base import RawData, register_dataset
from kdtune.errors import DataError

CLASSES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def official(name: str):
    """torchvision's dataset class for `name`: its folder, file names and official checksums."""
    import torchvision

    return getattr(torchvision.datasets, CLASSES[name])


def checksums(cls) -> dict[str, str]:
    """Every file of the layout and its official MD5."""
    return {**dict(cls.train_list + cls.test_list), cls.meta["filename"]: cls.meta["md5"]}


def unchecked(cls):
    """`cls` with no checksum to compare (torchvision's `check_integrity` accepts any existing file
    then): the rest of torchvision's class, reading and transforms, unchanged."""
    return type(cls.__name__, (cls,), {"train_list": [[f, None] for f, _ in cls.train_list],
                                       "test_list": [[f, None] for f, _ in cls.test_list],
                                       "meta": {**cls.meta, "md5": None}})


def _load(name: str, root: Path, download: bool) -> RawData:
    from torchvision.datasets.utils import check_integrity

    cls = official(name)
    folder = root / cls.base_folder
    missing = [f for f in checksums(cls) if not (folder / f).is_file()]
    if missing and download:
        try:
            cls(str(root), train=True, download=True)
        except Exception as exc:
            raise DataError(f"{name}: downloading {cls.url} into {root} failed ({type(exc).__name__}: {exc})") from None
        missing = [f for f in checksums(cls) if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{name}: no copy in {folder}/ (missing {', '.join(missing)}). Extract {cls.filename} "
                        f"into {root}/, or set data.download: true where the network is reachable.")
    differ = [f for f, md5 in checksums(cls).items() if not check_integrity(str(folder / f), md5)]
    if differ:
        warnings.warn(f"{name}: {', '.join(differ)} in {folder} do not have the official MD5 checksums "
                      "(a subset or another copy); loading them anyway", stacklevel=2)
    try:
        sets = [unchecked(cls)(str(root), train=train) for train in (True, False)]
    except Exception as exc:
        raise DataError(f"{name}: {folder} is not in the CIFAR pickle layout ({type(exc).__name__}: {exc})") from None
    tensors = []
    for ds in sets:  # torchvision keeps images as N x H x W x C
        tensors += [torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(ds.targets).long()]
    return tuple(tensors)


@register_dataset("cifar10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), num_classes=10)
def cifar10(root: Path, download: bool) -> RawData:
    return _load("cifar10", root, download)


@register_dataset("cifar100", (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), num_classes=100)
def cifar100(root: Path, download: bool) -> RawData:
    return _load("cifar100", root, download)


def write_copy(root, name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
               class_names: Optional[Sequence[str]] = None) -> Path:
    """Write (images N x 32 x 32 x 3 uint8, labels) pairs as a copy of `name` in the standard pickle
    layout under `root`: a subset of your own, or random images for tests and benchmarks.
    CIFAR-10's training images are spread over its five batch files. Returns the folder."""
    cls = official(name)
    folder = Path(root) / cls.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "labels" if name == "cifar10" else "fine_labels"
    names = list(class_names or [f"class_{i}" for i in range(10 if name == "cifar10" else 100)])

    def dump(file: str, images: np.ndarray, labels: np.ndarray) -> None:
        rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)  # channel planes
        entry = {"batch_label": file, "data": rows.astype(np.uint8), label_key: [int(y) for y in labels],
                 "filenames": [f"{i}.png" for i in range(len(images))]}
        (folder / file).write_bytes(pickle.dumps(entry))

    train_files = [f for f, _ in cls.train_list]
    for file, part in zip(train_files, np.array_split(np.arange(len(train[1])), len(train_files))):
        dump(file, train[0][part], train[1][part])
    dump(cls.test_list[0][0], *test)
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps({cls.meta["key"]: names}))
    return folder
