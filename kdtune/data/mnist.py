"""MNIST (bundled with kdtune, so a fresh clone runs offline) and Fashion-MNIST, via torchvision."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import torch

from kdtune.data.base import RawData, register_dataset
from kdtune.errors import DataError

BUNDLED = Path(__file__).resolve().parents[1] / "_data"
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


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


def unpack_bundled(root) -> None:
    """Fill `<root>/MNIST/raw/` from the copy bundled with kdtune, for torchvision's MNIST class."""
    _unpack_idx(Path(root), "MNIST")


def _load(cls_name: str, root: Path, download: bool) -> RawData:
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    _unpack_idx(root, cls_name)
    try:
        sets = [cls(str(root), train=train, download=download) for train in (True, False)]
    except Exception as exc:  # missing files, or offline with download: true
        raise DataError(
            f"{cls_name}: not found under {root / cls_name}/raw ({type(exc).__name__}). Put "
            f"{', '.join(IDX_FILES)} (or their .gz) in {root / cls_name / 'raw'}/, or set data.download: true "
            "where the network is reachable.") from None
    tensors = []
    for ds in sets:
        tensors += [torch.as_tensor(np.asarray(ds.data)).unsqueeze(1), torch.as_tensor(np.asarray(ds.targets)).long()]
    return tuple(tensors)


@register_dataset("mnist", (0.1307,), (0.3081,))
def mnist(root: Path, download: bool) -> RawData:
    return _load("MNIST", root, download)


@register_dataset("fashion_mnist", (0.2860,), (0.3530,))
def fashion_mnist(root: Path, download: bool) -> RawData:
    return _load("FashionMNIST", root, download)
