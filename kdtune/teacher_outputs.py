"""The teacher's outputs on streamed data, computed once per sweep and kept on disk: one
memory-mapped fp16 `.npy` file per target, read by sample index in the trials, which never run
the teacher for them and never hold more than a batch of them in memory.

Logits of many classes (ImageNet's 1,000) can be kept as their top k (`teacher.topk`): the k
largest logits of each image in fp16, their class indices, and the mean of the other logits,
which stands in for each of them when a trial reads the row back. That mean is at most the
others' log-mean-exp (Jensen), so no dropped class gains probability mass relative to the kept
ones: at any temperature T, the total variation distance between softmax(logits / T) and
softmax(read-back / T) is at most the teacher's softmax(logits / T) mass outside its top k
(plus fp16 rounding). The k kept logits, and so the ranking of the top k, are exact to fp16.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from kdtune.distill import TEACHER_TARGETS

TOP_K_KEY = "logits"  # the one target top-k compression applies to


@dataclass
class DiskOutputs:
    """Targets on disk under `folder`: `shapes` maps each key to one image's target shape; with
    `topk`, the logits are kept as their k largest (see the module docstring for the error)."""

    folder: str
    shapes: dict[str, tuple[int, ...]]
    count: int
    topk: Optional[int] = None
    _open: dict = field(default_factory=dict, repr=False)

    def __getstate__(self):  # trials open the files themselves, by path
        return {**self.__dict__, "_open": {}}

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.shapes)

    def compressed(self, key: str) -> bool:
        return key == TOP_K_KEY and self.topk is not None and self.topk < self.shapes[key][0]

    def files(self, key: str) -> dict[str, Path]:
        parts = ("values", "indices", "rest") if self.compressed(key) else ("values",)
        return {part: Path(self.folder) / f"{key}.{part}.npy" for part in parts}

    def _arrays(self, key: str) -> dict[str, np.ndarray]:
        if key not in self._open:
            self._open[key] = {part: np.load(path, mmap_mode="r") for part, path in self.files(key).items()}
        return self._open[key]

    def read(self, keys, idx: torch.Tensor, device) -> dict[str, torch.Tensor]:
        """The rows `idx` of each target in `keys`, as float32 on `device`."""
        rows = idx.cpu().numpy()
        out = {}
        for key in keys:
            arrays = {part: torch.from_numpy(np.ascontiguousarray(a[rows])) for part, a in self._arrays(key).items()}
            if self.compressed(key):
                full = arrays["rest"].float()[:, None].expand(len(rows), self.shapes[key][0]).clone()
                value = full.scatter_(1, arrays["indices"].long(), arrays["values"].float())
            else:
                value = arrays["values"].float()
            out[key] = value.to(device, non_blocking=True)
        return out


def index_type(classes: int) -> type:
    """The narrowest integer type for the top-k class indices."""
    return np.int16 if classes <= np.iinfo(np.int16).max else np.int32


def sizes_mb(shapes: dict[str, tuple[int, ...]], count: int, topk: Optional[int]) -> dict[str, float]:
    """The disk size of each target for `count` images: fp16, the top-k logits with their indices."""
    def one(key, shape):
        if key == TOP_K_KEY and topk is not None and topk < shape[0]:
            return topk * (2 + np.dtype(index_type(shape[0])).itemsize) + 2
        return int(np.prod(shape)) * 2
    return {key: count * one(key, shape) / 2 ** 20 for key, shape in shapes.items()}


@torch.no_grad()
def write_outputs(teacher: nn.Module, loader, count: int, shapes: dict[str, tuple[int, ...]], folder: Path,
                  topk: Optional[int], device) -> DiskOutputs:
    """One teacher pass over `loader` (the training set in index order, batches of (images,
    labels, indices)), writing each target of `shapes` to its memory-mapped file in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    outputs = DiskOutputs(str(folder), shapes, count, topk)
    files = {}
    for key, shape in shapes.items():
        paths = outputs.files(key)
        if outputs.compressed(key):
            files[key] = {"values": np.lib.format.open_memmap(paths["values"], "w+", np.float16, (count, topk)),
                          "indices": np.lib.format.open_memmap(paths["indices"], "w+", index_type(shape[0]),
                                                               (count, topk)),
                          "rest": np.lib.format.open_memmap(paths["rest"], "w+", np.float16, (count,))}
        else:
            files[key] = {"values": np.lib.format.open_memmap(paths["values"], "w+", np.float16, (count, *shape))}
    for x, _, idx in loader:
        features = teacher(x.to(device))
        rows = idx.numpy()
        for key in shapes:
            value = TEACHER_TARGETS[key](features).float().cpu()
            if outputs.compressed(key):
                top = value.topk(topk, dim=1)
                kept = torch.zeros_like(value, dtype=torch.bool).scatter_(1, top.indices, True)
                rest = value.masked_fill(kept, 0).sum(1) / (value.shape[1] - topk)
                files[key]["values"][rows] = top.values.half().numpy()
                files[key]["indices"][rows] = top.indices.numpy()
                files[key]["rest"][rows] = rest.half().numpy()
            else:
                files[key]["values"][rows] = value.half().numpy()
    for arrays in files.values():
        for array in arrays.values():
            array.flush()
    return outputs
