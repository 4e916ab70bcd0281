"""Datasets as normalised tensors: built-ins (one module each, registered on import), import
paths and in-memory pairs, resolved in kdtune.data.resolve; or streamed (kdtune.data.stream)."""
import importlib
import pkgutil

from kdtune.data.base import DATASETS, BuiltinDataset, register_dataset
from kdtune.data.splits import Splits, batches

NOT_DATASETS = {"base", "splits", "resolve", "augment", "stream", "imagefolder"}

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in NOT_DATASETS:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DATASETS", "BuiltinDataset", "Splits", "batches", "register_dataset"]
