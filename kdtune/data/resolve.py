"""Where the data comes from: a built-in name, an import path to a factory returning
`(train, test)` datasets (or a dict of DataLoaders), or those given to `kdtune.run`; all end as
`Splits`, held in memory, or as a `Stream` (`load_data` chooses, by `data.resident`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from kdtune.data.base import DATASETS
from kdtune.data.splits import Splits, normalise, split, split_indices
from kdtune.data.stream import Stream, class_count, subset
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
        raise SpecError(WHERE, f"{source} gave a {type(given).__name__}; expected a (train, test) pair of datasets "
                               "or a dict of DataLoaders (train, test, val)")
    return given[0], given[1]


def _user_data(data, given) -> Any:
    """What the user's data source gave: a (train, test) pair or a dict of DataLoaders."""
    if data.dataset.startswith(IN_MEMORY):
        if given is None:
            raise SpecError(WHERE, f"{data.dataset!r} names data given to kdtune.run, and none was given")
        return given
    factory = import_object(data.dataset, WHERE)
    try:
        return factory(root=data.root, **data.kwargs) if accepts(factory, "root") else factory(**data.kwargs)
    except Exception as exc:
        raise SpecError(WHERE, f"{data.dataset}() raised {type(exc).__name__}: {exc}") from None


def _source(data) -> str:
    return "kdtune.run(data=...)" if data.dataset.startswith(IN_MEMORY) else f"{data.dataset}()"


def _builtin(data, seed: int) -> Splits:
    builtin = DATASETS[data.dataset]
    train_x, train_y, test_x, test_y = builtin.load(Path(data.root), data.download)
    return split(normalise(train_x, builtin.mean, builtin.std), train_y, normalise(test_x, builtin.mean, builtin.std),
                 test_y, data.val_size, seed, data.train_limit, data.test_limit,
                 data.num_classes or builtin.num_classes, builtin.mean, builtin.std)


def _resident(data, seed: int, train, test) -> Splits:
    (train_x, train_y), (test_x, test_y) = to_tensors(train, "train"), to_tensors(test, "test")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise SpecError(WHERE, f"train images are {tuple(train_x.shape[1:])}, test images {tuple(test_x.shape[1:])}")
    if data.num_classes is not None and int(max(train_y.max(), test_y.max())) >= data.num_classes:
        raise SpecError("data.num_classes", f"labels go up to {int(max(train_y.max(), test_y.max()))}, "
                                            f"so num_classes must be above that (got {data.num_classes})")
    return split(train_x, train_y, test_x, test_y, data.val_size, seed, data.train_limit, data.test_limit,
                 data.num_classes)


def load_splits(data, seed: int, given: Optional[tuple] = None) -> Splits:
    """The spec's data (`data` is its `data` section) as normalised, split tensors in memory."""
    if data.dataset in DATASETS:
        return _builtin(data, seed)
    train, test = _pair(_user_data(data, given), _source(data))
    return _resident(data, seed, train, test)


# --- streamed data -------------------------------------------------------------------------------

PROBE = 8  # images of each split kept in memory when streaming: the checks' batch, the model example
REPEAT_CHECKS = 8  # indices read twice to tell a random transform


@dataclass
class Loaded:
    """The sweep's data: `splits` holds all of it on the resident path, and a few images of each
    split when streaming (for the checks before Ray starts and the deployable model's example);
    `stream` the streamed sets; `path` (resident or streamed) and the `reason` it was chosen."""

    splits: Splits
    stream: Optional[Stream]
    path: str
    reason: str


class TensorPairs(Dataset):
    """In-memory tensors as a dataset of (image, label): a built-in dataset streamed."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def default_resident_mb() -> float:
    """A quarter of the machine's memory, in MB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4 / 2 ** 20


def _choose(data, train) -> tuple[bool, bool, str]:
    """(resident, random, reason): whether `data.resident` keeps the training set in memory,
    and whether its `__getitem__` applies a random transform (two reads of one index differ)."""
    checked = torch.linspace(0, len(train) - 1, min(REPEAT_CHECKS, len(train))).long().unique().tolist()
    differs = next((i for i in checked if not torch.equal(_item(train, i, "train")[0], _item(train, i, "train")[0])),
                   None)
    if data.resident is True:
        return True, differs is not None, "data.resident: true"
    if data.resident is False:
        return False, differs is not None, "data.resident: false"
    if differs is not None:
        return False, True, f"train[{differs}] gave a different image on a second read (a random transform)"
    n = min(data.train_limit or len(train), len(train))
    size_mb = n * _item(train, 0, "train")[0].numel() * 4 / 2 ** 20
    budget = data.resident_mb or default_resident_mb()
    if size_mb > budget:
        return False, False, f"the training set's float32 size, {size_mb:,.0f} MB, is over data.resident_mb ({budget:,.0f} MB)"
    return True, False, (f"the training set's float32 size, {size_mb:,.0f} MB, is within data.resident_mb "
                         f"({budget:,.0f} MB) and __getitem__ repeats its images")


def _first_batch(loader, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The loader's first batch, which must be (inputs, labels) tensors."""
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise SpecError(WHERE, f"the {name} DataLoader yields no batch") from None
    except Exception as exc:
        raise SpecError(WHERE, f"reading the {name} DataLoader raised {type(exc).__name__}: {exc}") from None
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(v, torch.Tensor) for v in batch)):
        shown = type(batch).__name__ if not isinstance(batch, (tuple, list)) else \
            f"({', '.join(type(v).__name__ for v in batch)})"
        raise SpecError(WHERE, f"the {name} DataLoader yields {shown}; each batch must be (inputs, labels) tensors")
    return batch[0], batch[1]


def _probe(dataset, collate, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    loader = DataLoader(subset(dataset, range(min(PROBE, len(dataset)))), batch_size=PROBE, collate_fn=collate)
    x, y = _first_batch(loader, name)
    return x.float(), y.long()


def _streamed(data, seed: int, train, val: dict, test, collate, random: bool, reason: str) -> Loaded:
    """The stream of these sets (validation split off `train` unless `val` names sets), with
    `train_limit` and `test_limit` applied, and the probe splits."""
    if not val:
        train_idx, val_idx = split_indices(len(train), data.val_size, seed, data.train_limit)
        train, val = subset(train, train_idx), {"val": subset(train, val_idx)}
    elif data.train_limit:
        train = subset(train, range(min(data.train_limit, len(train))))
    test = subset(test, range(min(data.test_limit or len(test), len(test))))
    classes = data.num_classes or class_count(train)
    if classes is None:
        raise SpecError("data.num_classes", "the streamed training set declares no classes (no `classes` or "
                                            "`targets` attribute); set data.num_classes")
    first_val = next(iter(val))
    (tx, ty), (vx, vy), (sx, sy) = (_probe(ds, collate, name) for name, ds in
                                    (("train", train), (first_val, val[first_val]), ("test", test)))
    builtin = DATASETS.get(data.dataset)
    mean, std = (builtin.mean, builtin.std) if builtin else (None, None)
    splits = Splits(tx, ty, vx, vy, sx, sy, classes, mean, std)
    stream = Stream(train, val, test, data.workers, data.prefetch, collate, random)
    return Loaded(splits, stream, "streamed", reason)


def _from_loaders(data, seed: int, loaders: dict) -> Loaded:
    """DataLoaders given as {"train": ..., "test": ..., "val": loader or {name: loader}}: kdtune
    streams their datasets with the train loader's collate_fn, in batches of train.batch_size."""
    unknown = set(loaders) - {"train", "val", "test"}
    if unknown or not {"train", "test"} <= set(loaders):
        raise SpecError(WHERE, f"DataLoaders come as a dict with keys train, test and optionally val; got "
                               f"{', '.join(sorted(map(str, loaders)))}")
    val = loaders.get("val") or {}
    val = val if isinstance(val, dict) else {"val": val}
    named = {"train": loaders["train"], "test": loaders["test"], **val}
    odd = next((name for name, loader in named.items() if not isinstance(loader, DataLoader)), None)
    if odd is not None:
        raise SpecError(WHERE, f"{odd} is a {type(named[odd]).__name__}, not a torch DataLoader")
    if data.resident is True:
        raise SpecError("data.resident", "DataLoaders are streamed; give (train, test) datasets to hold them in memory")
    for name, loader in named.items():
        _first_batch(loader, name)
    train = loaders["train"]
    random = _choose(data, train.dataset)[1]
    return _streamed(data, seed, train.dataset, {k: v.dataset for k, v in val.items()}, loaders["test"].dataset,
                     train.collate_fn, random, "DataLoaders given")


def load_data(data, seed: int, given: Any = None) -> Loaded:
    """The spec's data on the path `data.resident` chooses: resident Splits, or a Stream."""
    if data.dataset in DATASETS:
        splits = _builtin(data, seed)
        if data.resident is not False:
            return Loaded(splits, None, "resident", "a built-in dataset, held in memory")
        stream = Stream(TensorPairs(splits.train_x, splits.train_y), {"val": TensorPairs(splits.val_x, splits.val_y)},
                        TensorPairs(splits.test_x, splits.test_y), data.workers, data.prefetch)
        probe = Splits(*(t[:PROBE] for t in (splits.train_x, splits.train_y, splits.val_x, splits.val_y,
                                             splits.test_x, splits.test_y)), splits.num_classes, splits.mean, splits.std)
        return Loaded(probe, stream, "streamed", "data.resident: false")
    made = _user_data(data, given)
    if isinstance(made, dict):
        return _from_loaders(data, seed, made)
    train, test = _pair(made, _source(data))
    for name, ds in (("train", train), ("test", test)):
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
            raise SpecError(WHERE, f"{name} is a {type(ds).__name__}, not a map-style dataset (__len__ and __getitem__)")
        if len(ds) == 0:
            raise SpecError(WHERE, f"{name} is empty")
    resident, random, reason = _choose(data, train)
    if resident:
        splits = _resident(data, seed, train, test)
        return Loaded(splits, None, "resident", reason)
    return _streamed(data, seed, train, {}, test, None, random, reason)
