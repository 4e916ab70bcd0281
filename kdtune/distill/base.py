"""The one interface every distillation method implements, and its registry.

A method never calls the teacher: it receives teacher *targets* (logits, embedding,
feature maps or attention maps, named by `TEACHER_TARGETS`), so the sweep can compute
them once and share them between trials; a method that reuses the teacher's classifier gets
a frozen copy of that head alone. It returns a dict of named, already weighted loss terms;
the trainer sums and logs them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdtune.models import Features


def attention(feature_map: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis' spatial attention map, B x H x W: the channel mean of squares
    (normalised only when compared, so a teacher's map can first be resized to a student's)."""
    return feature_map.pow(2).mean(1)


# Names a method may ask of the teacher, and how each is read off its Features.
TEACHER_TARGETS: dict[str, Callable[[Features], torch.Tensor]] = {
    "logits": lambda f: f.logits,
    "embedding": lambda f: f.embedding,
    "attention0": lambda f: attention(f.maps[-2]),  # the last two stages
    "attention1": lambda f: attention(f.maps[-1]),
}


@dataclass(frozen=True)
class Param:
    """A method parameter: its default and the closed interval it must lie in (open at 0 if positive)."""

    default: float
    low: float = -math.inf
    high: float = math.inf
    positive: bool = False
    integer: bool = False

    def check(self, value) -> str | None:
        """None if `value` is allowed, else a description of what is allowed."""
        kind = "an integer" if self.integer else "a number"
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.integer:
            ok = ok and float(value).is_integer()
        if ok and self.positive:
            ok = value > 0
        ok = ok and self.low <= value <= self.high
        return None if ok else f"{kind} in {self.describe()}"

    def describe(self) -> str:
        low = "(0" if self.positive else f"[{self.low:g}"
        return f"{low}, {self.high:g}]"


class Distiller(nn.Module):
    """Base of all methods. Subclasses set `name`, `params`, and implement `losses`.

    Args given to every method: the student's and the teacher targets' shapes (a forward
    of one small batch), the training-set size (for memory banks), the CE weight and label
    smoothing, the teacher's frozen classifier head (for methods that set
    `needs_teacher_head`, else None), the student module (to copy, never to train: the
    trial trains it) and the method's own parameters (defaults filled in).

    A method's own trainable modules (a regressor, dml's peers, byot's auxiliary heads) are
    its submodules: the trial trains and checkpoints them with it, counts them as
    `extra_params`, and deploys the student alone.
    """

    name: ClassVar[str]
    params: ClassVar[dict[str, Param]] = {}
    needs_conv_student: ClassVar[bool] = False
    needs_teacher_head: ClassVar[bool] = False  # reads the teacher's classifier weights, not only its outputs
    teacher_keys: ClassVar[tuple[str, ...]] = ("logits",)  # the TEACHER_TARGETS this method reads
    # reads the batch's images as t[INPUTS], to run models of its own on them (dml's peers)
    needs_inputs: ClassVar[bool] = False

    def __init__(self, student: Features, teacher: dict[str, torch.Tensor], num_train: int,
                 ce_weight: float = 1.0, label_smoothing: float = 0.0, teacher_head: Optional[nn.Module] = None,
                 student_model: Optional[nn.Module] = None, **params):
        super().__init__()
        self.ce_weight, self.label_smoothing = ce_weight, label_smoothing
        self.hp = {k: params.get(k, p.default) for k, p in self.params.items()}
        unknown = set(params) - set(self.params)
        if unknown:
            raise ValueError(f"{self.name}: unknown parameter(s) {sorted(unknown)}; allowed: {sorted(self.params)}")

    def ce(self, s: Features, labels: torch.Tensor) -> torch.Tensor:
        return self.ce_weight * F.cross_entropy(s.logits, labels, label_smoothing=self.label_smoothing)

    def losses(self, s: Features, t: dict[str, torch.Tensor], labels: torch.Tensor,
               idx: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        """Named loss terms for one batch. `idx` are the batch's dataset indices and
        `progress` the epochs done so far (fractional), for warm-ups."""
        raise NotImplementedError

    def evaluated(self) -> dict[str, nn.Module]:
        """Models of the method's own (returning Features) whose validation accuracy the trial
        logs every epoch as `val_acc_<name>`: dml's peers, byot's auxiliary classifiers."""
        return {}

    def forward(self, *args, **kwargs):
        return self.losses(*args, **kwargs)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every data-parallel worker's `values`, concatenated (this one's alone in a single process):
        a method with state across batches updates it from all workers' batches, so that it stays
        the same on every worker. The trial replaces it when it trains on several workers."""
        return values


INPUTS = "inputs"  # the batch's images among a `needs_inputs` method's targets

METHODS: dict[str, type[Distiller]] = {}
"""Every registered method by name: the keys a spec's `search.space.loss` may use."""


def register(cls: type[Distiller]) -> type[Distiller]:
    """Class decorator: adds a method to METHODS under its `name`, so specs can search it."""
    METHODS[cls.name] = cls
    return cls
