"""The user's evaluation: `function(model, data_loader) -> {name: number}`, the inference-pipeline
contract of the toolkit kdtune's users come from, scoring a student the way their project does.

The spec names it (`evaluate: package.module:function`, imported like a model's import path,
never executed from YAML) or `kdtune.run(evaluate=...)` gives it. It gets the student as a plain
module mapping an input batch to logits, and a DataLoader of `(inputs, labels)` batches; each
name it returns becomes `val_<name>` every epoch and `test_<name>` at the end.
"""
from __future__ import annotations

import inspect
import math
import numbers
import re
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdtune.errors import SpecError
from kdtune.models.resolve import IN_MEMORY, import_object

KEY = "evaluate"
BATCH = 1000  # samples per evaluation batch, as kdtune's own accuracy pass
NAME = re.compile(r"^[A-Za-z0-9_]+$")  # a metric name that reads the same in MLflow, CSV and --set


class LogitsOnly(nn.Module):
    """The student as an inference pipeline sees it: an input batch in, logits out (kdtune's
    students return a Features record)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = BATCH) -> DataLoader:
    """A DataLoader of `(inputs, labels)` batches over resident tensors, in order: each batch is a
    slice of the tensors (no per-sample collation, no copy), on the tensors' own device."""
    slices = [slice(start, start + batch_size) for start in range(0, len(y), batch_size)]
    return DataLoader(TensorDataset(x, y), sampler=slices, batch_size=None)


class OnDevice:
    """A loader whose `(inputs, labels)` batches are moved to the trial's device: a streamed
    loader yields them on the CPU (pinned on CUDA), and the user's function gets them where the
    student is, as on the resident path."""

    def __init__(self, data: DataLoader, device):
        self.data, self.device = data, torch.device(device)

    def __iter__(self):
        for x, y in self.data:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def __len__(self) -> int:
        return len(self.data)


def resolve(path: Optional[str], given: Optional[Callable] = None) -> Optional[Callable]:
    """The function the spec's `evaluate` names (`given` for `python:`), checked to take
    `(model, data_loader)`; None without one. A SpecError at `evaluate` says what is wrong."""
    if path is None:
        return None
    if path.startswith(IN_MEMORY):
        if given is None:
            raise SpecError(KEY, f"{path!r} names a function given to kdtune.run, and none was given")
        found = given
    else:
        found = import_object(path, KEY)
    if not callable(found):
        raise SpecError(KEY, f"{path} is a {type(found).__name__}, not a function(model, data_loader)")
    try:
        inspect.signature(found).bind(None, None)
    except TypeError as exc:
        raise SpecError(KEY, f"{path} cannot be called as function(model, data_loader): {exc}") from None
    except ValueError:  # no signature to read (a builtin): the first call tells
        pass
    return found


def _number(value) -> Optional[float]:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value.item())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def checked(metrics, where: str) -> dict[str, float]:
    """The evaluation's result as {name: float}, or a SpecError at `evaluate` saying what it returned."""
    if not isinstance(metrics, dict) or not metrics:
        shown = "an empty dict" if isinstance(metrics, dict) else f"a {type(metrics).__name__}"
        raise SpecError(KEY, f"{where} returned {shown}; it must return a dict of named metrics, e.g. {{'f1': 0.93}}")
    found = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise SpecError(KEY, f"{where} returned the metric name {name!r}; names are letters, digits and _")
        number = _number(value)
        if number is None:
            raise SpecError(KEY, f"{where} returned {name}={value!r} ({type(value).__name__}); each metric must be "
                                 "a number (int, float or a one-element tensor)")
        found[name] = number
    return found


def score(model: nn.Module, data: Iterable, fn: Callable) -> dict[str, float]:
    """`fn(model, data)` on a kdtune student (a model returning Features), as {name: float}: the
    student in eval mode behind a logits-only wrapper, no gradients; its training mode is restored."""
    was_training = model.training
    model.eval()
    where = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', fn)}"
    try:
        with torch.no_grad():
            found = fn(LogitsOnly(model), data)
    except Exception as exc:
        raise SpecError(KEY, f"{where}(model, data_loader) raised {type(exc).__name__}: {exc}") from None
    finally:
        model.train(was_training)
    return checked(found, where)


def top1_top5(model: nn.Module, data: Iterable) -> dict[str, float]:
    """Top-1 and top-5 accuracy ({"acc", "top5"}: val_acc and val_top5); with fewer than five
    classes, top-k over all of them."""
    total, top1, top5 = 0, 0, 0
    for x, y in data:
        logits = model(x)
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = best == y.view(-1, 1)
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
        total += len(y)
    if total == 0:
        return {"acc": math.nan, "top5": math.nan}
    return {"acc": top1 / total, "top5": top5 / total}
