"""Where the data comes from: a built-in name, an import path to a factory returning
`(train, test)` datasets, or that pair given to `kdtune.run`; all end as `Splits`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from kdtune.data.base import DATASETS
from kdtune.data.splits import Splits, normalise, split
from kdtune.errors import SpecError
from kdtune.models.resolve import IN_MEMORY, accepts, import_object

WHERE = "data.dataset"


def _item(ds, i: int, name: str) -> tuple[torch.Tensor, int]:
    try:
        item = ds[i]
    except Exception as exc:
        raise SpecError(WHERE, f"reading {name}[{i}] raised {type(exc).__name__}: {exc}") from None
    ok = (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor)
          and isinstance(item[1], int) or isinstance(item, (tuple, list)) and len(item) == 2
          and isinstance(item[0], torch.Tensor) and isinstance(item[1], torch.Tensor) and item[1].numel() == 1
          and not item[1].is_floating_point())
    if not ok:
        shown = type(item).__name__ if not isinstance(item, (tuple, list)) else \
            f"({', '.join(type(v).__name__ for v in item)})"
        raise SpecError(WHERE, f"{name}[{i}] is {shown}; each item must be (image tensor, int label)")
    return item[0], int(item[1])


def to_tensors(ds, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A map-style dataset of (tensor, int) as one image tensor and one label tensor, in memory."""
    if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
        raise SpecError(WHERE, f"{name} is a {type(ds).__name__}, not a map-style dataset (__len__ and __getitem__)")
    if len(ds) == 0:
        raise SpecError(WHERE, f"{name} is empty")
    items = [_item(ds, i, name) for i in range(len(ds))]
    shape = items[0][0].shape
    odd = next((i for i, (x, _) in enumerate(items) if x.shape != shape), None)
    if odd is not None:
        raise SpecError(WHERE, f"{name}[{odd}] has shape {tuple(items[odd][0].shape)}, {name}[0] {tuple(shape)}: "
                               "images must all have one shape")
    return torch.stack([x.float() for x, _ in items]).contiguous(), torch.tensor([y for _, y in items])


def _pair(given: Any, source: str) -> tuple[Any, Any]:
    if not (isinstance(given, (tuple, list)) and len(given) == 2):
        raise SpecError(WHERE, f"{source} gave a {type(given).__name__}; expected a (train, test) pair of datasets")
    return given[0], given[1]


def load_splits(data, seed: int, given: Optional[tuple] = None) -> Splits:
    """The spec's data (`data` is its `data` section) as normalised, split tensors."""
    if data.dataset in DATASETS:
        builtin = DATASETS[data.dataset]
        train_x, train_y, test_x, test_y = builtin.load(Path(data.root), data.download)
        return split(normalise(train_x, builtin.mean, builtin.std), train_y, normalise(test_x, builtin.mean, builtin.std),
                     test_y, data.val_size, seed, data.train_limit, data.test_limit,
                     data.num_classes or builtin.num_classes, builtin.mean, builtin.std)
    if data.dataset.startswith(IN_MEMORY):
        if given is None:
            raise SpecError(WHERE, f"{data.dataset!r} names data given to kdtune.run, and none was given")
        train, test = _pair(given, "kdtune.run(data=...)")
    else:
        factory = import_object(data.dataset, WHERE)
        try:
            made = factory(root=data.root) if accepts(factory, "root") else factory()
        except Exception as exc:
            raise SpecError(WHERE, f"{data.dataset}() raised {type(exc).__name__}: {exc}") from None
        train, test = _pair(made, f"{data.dataset}()")
    (train_x, train_y), (test_x, test_y) = to_tensors(train, "train"), to_tensors(test, "test")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise SpecError(WHERE, f"train images are {tuple(train_x.shape[1:])}, test images {tuple(test_x.shape[1:])}")
    if data.num_classes is not None and int(max(train_y.max(), test_y.max())) >= data.num_classes:
        raise SpecError("data.num_classes", f"labels go up to {int(max(train_y.max(), test_y.max()))}, "
                                            f"so num_classes must be above that (got {data.num_classes})")
    return split(train_x, train_y, test_x, test_y, data.val_size, seed, data.train_limit, data.test_limit,
                 data.num_classes)
