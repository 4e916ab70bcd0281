"""One teacher->student training: a pure function of a TrialPlan and the sweep's data.

No Ray here: `run_trial` reports each epoch through a callback, so the same code runs
inside a Ray Tune trial, in a benchmark loop or in a test.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdtune.data import Splits, batches
from kdtune.data.augment import Augment
from kdtune.distill import METHODS, TEACHER_TARGETS
from kdtune.models import count_params
from kdtune.models.features import student_params
from kdtune.models.resolve import build_model
from kdtune.parallel import Learner, Ranks
from kdtune.recipe import make_optimizer, make_schedule
from kdtune.space import TrialPlan


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` on `device`. On CUDA its 4-D (conv) weights go channels_last, the layout cuDNN's
    fastest kernels (tensor cores under bf16) read without transposes; on a CPU nothing changes."""
    if device.type == "cuda":
        return model.to(device, memory_format=torch.channels_last)
    return model.to(device)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of a model returning Features."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size]).logits
        target = y[start:start + batch_size]
        correct += (logits.argmax(1) == target).sum().item()
        loss += F.cross_entropy(logits, target, reduction="sum").item()
    model.train(was_training)
    return correct / len(y), loss / len(y)


@dataclass
class SweepData:
    """What every trial shares, computed once per sweep: the splits and the teacher's cached
    train-set targets, the frozen teacher itself for targets too large to cache, the teacher's
    frozen classifier head for methods that reuse it (one layer, not the teacher's body), and
    the student factory given to kdtune.run (for `student.arch: python:...`)."""

    splits: Splits
    targets: dict[str, torch.Tensor]
    teacher: Optional[nn.Module] = field(repr=False, default=None)
    student_factory: Optional[Callable] = field(repr=False, default=None)
    per_view: bool = False  # targets hold every augmented view of each image: N x views x ...
    teacher_head: Optional[nn.Module] = field(repr=False, default=None)

    def __getstate__(self):
        """Tensors travel as numpy arrays: Ray maps those from its object store without a
        copy, so a trial starts without unpickling hundreds of MB of data."""
        return {**self.__dict__, "splits": self.splits.map(torch.Tensor.numpy),
                "targets": {k: v.numpy() for k, v in self.targets.items()}}

    def __setstate__(self, state):
        with warnings.catch_warnings():  # the shared buffers are read-only, and trials only read them
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            splits = state.pop("splits").map(torch.from_numpy)
            targets = {k: torch.from_numpy(v) for k, v in state.pop("targets").items()}
        self.__dict__.update(state, splits=splits, targets=targets)

    def to(self, device) -> "SweepData":
        moved = self.splits.map(lambda t: t.to(device))
        teacher, head = (m.to(device) if m is not None else None for m in (self.teacher, self.teacher_head))
        return SweepData(moved, {k: v.to(device) for k, v in self.targets.items()}, teacher, self.student_factory,
                         self.per_view, head)


def build_student(spec, data: SweepData) -> nn.Module:
    """The student of a (resolved) spec, built as every trial builds it: a built-in family,
    `torchvision:`, an import path, or the factory given to kdtune.run."""
    splits = data.splits
    return build_model(spec.student, splits.in_shape, splits.num_classes, "student", spec.student.width,
                       data.student_factory)


class TeacherTargets:
    """Serves a batch's teacher targets: cached rows by dataset index (and, for a cache of every
    augmented view, by the view each image was given), the rest by a live forward."""

    def __init__(self, data: SweepData, keys: tuple[str, ...], device):
        self.cached = {k: data.targets[k] for k in keys if k in data.targets}
        self.live = [k for k in keys if k not in data.targets]
        self.per_view = data.per_view
        self.teacher = None
        self.live_batches = self.live_samples = 0
        if self.live:
            self.teacher = to_device(data.teacher, torch.device(device)).eval().requires_grad_(False)

    def __call__(self, idx: torch.Tensor, x: torch.Tensor, views: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        if self.per_view:
            views = torch.zeros_like(idx) if views is None else views
            out = {k: v[idx, views].float() for k, v in self.cached.items()}
        else:
            out = {k: v.index_select(0, idx) for k, v in self.cached.items()}
        if self.live:
            self.live_batches += 1
            self.live_samples += len(idx)
            with torch.no_grad():
                features = self.teacher(x)
            out.update({k: TEACHER_TARGETS[k](features) for k in self.live})
        return out


def accumulate_step(loss: torch.Tensor, step: int, steps: int, accumulate: int, optimizer, schedule,
                    learner: Optional[nn.Module], ranks: Ranks) -> None:
    """Backward of one of `accumulate` micro-batches (or of fewer, the epoch's last group), each
    weighted by the group's size so that the step sees their mean gradient; the optimizer steps,
    and DDP all-reduces, on the group's last micro-batch only."""
    first = step - step % accumulate
    size = min(accumulate, steps - first)
    last = step == first + size - 1
    with ranks.syncing(learner, last):
        (loss / size).backward()
    if last:
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)


def run_trial(plan: TrialPlan, data: SweepData,
              report: Callable[[dict, Optional[Callable[[], dict]]], None],
              state: Optional[dict] = None, device: str | torch.device = "cpu",
              student: Optional[nn.Module] = None, ranks: Ranks = Ranks()) -> dict:
    """Train the plan's student (or the `student` given, in place) for its epochs;
    `report(metrics, get_state)` once per epoch.

    With `ranks` of a started process group (kdtune.distributed), this process trains its shard
    of each batch in DistributedDataParallel; rank 0 alone evaluates and reports, with the losses
    averaged over all ranks, and every rank stops when its `report` returns False.

    `get_state` is given on checkpoint epochs (every `train.checkpoint_every` and the last):
    calling it returns everything needed to resume. A non-finite loss ends the trial with
    `diverged: True` and val_acc NaN. Returns the last metrics. Leaves denormals flushed to zero
    in the calling thread (torch.set_flush_denormal).
    """
    # Adam's moments of rarely active weights (MNIST's border pixels) decay through the subnormal
    # range, where CPU float ops are many times slower: a fused Adam step over 109k weights, 20k of
    # them with subnormal moments, took 5x as long as with them flushed to zero.
    torch.set_flush_denormal(True)
    spec = plan.spec
    device = torch.device(device)
    mixed_precision = spec.train.mixed_precision and device.type == "cuda"
    # entered only when on: even a disabled autocast costs a small student's step ~2%
    precision = (lambda: torch.autocast(device.type, torch.bfloat16)) if mixed_precision else contextlib.nullcontext
    torch.manual_seed(plan.seed)
    generator = torch.Generator().manual_seed(plan.seed)
    splits = data.splits
    student = to_device(student if student is not None else build_student(spec, data), device)
    augment = Augment.of(spec.data.augment, splits)
    method = METHODS[plan.method]
    targets = TeacherTargets(data, method.teacher_keys, device)
    probe = torch.arange(2, device=device)
    student.eval()  # the shape probe must not move batch-norm statistics
    with torch.no_grad():
        distiller = method(student(splits.train_x[probe]), targets(probe, splits.train_x[probe]),
                           len(splits.train_y), spec.train.ce_weight, label_smoothing=spec.train.label_smoothing,
                           teacher_head=data.teacher_head, **plan.method_params).to(device)
    targets.live_batches = targets.live_samples = 0
    distiller.gather = ranks.gather  # a method with state (CRD's banks) updates it with every rank's batch
    epochs, n, accumulate = spec.train.epochs, len(splits.train_y), spec.train.accumulate
    optimizer = make_optimizer(spec.train, [p for m in (student, distiller) for p in m.parameters() if p.requires_grad])
    steps = math.ceil(math.ceil(n / (spec.train.batch_size * ranks.world)) / accumulate)  # optimizer steps an epoch
    schedule = make_schedule(spec.train, optimizer, steps)
    first_epoch = 0
    if state:
        student.load_state_dict(state["student"])
        distiller.load_state_dict(state["distiller"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        first_epoch = state["epoch"]
    fixed = {"params": student_params(student), "extra_params": count_params(distiller)}
    learner = ranks.wrap(Learner(student, distiller), device) if ranks.world > 1 else None
    metrics: dict = {}
    for epoch in range(first_epoch, epochs):
        started = time.time()
        student.train()
        history: dict[str, list[torch.Tensor]] = defaultdict(list)  # summed once per epoch, not per step
        order = batches(n, spec.train.batch_size, generator, device, ranks.rank, ranks.world)
        for step, idx in enumerate(order):
            x, y = splits.train_x.index_select(0, idx), splits.train_y.index_select(0, idx)  # 2x faster than [idx] on CPU
            views = augment.draw(len(idx), generator, device) if augment else None
            if augment:
                x = augment.apply(x, views)
            progress = epoch + step / len(order)
            with precision():
                if learner is None:
                    terms = distiller(student(x), targets(idx, x, views), y, idx, progress)
                else:
                    terms = learner(x, targets(idx, x, views), y, idx, progress)
            first, *rest = terms.values()
            loss = sum(rest, first)  # not sum(terms.values()): that adds its start, 0, as one more op a step
            if accumulate == 1:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            else:
                accumulate_step(loss, step, len(order), accumulate, optimizer, schedule, learner, ranks)
            for name, value in terms.items():
                history[name].append(value.detach())
        losses = dict(zip((f"loss_{k}" for k in history),
                          ranks.mean(torch.stack([torch.stack(v).mean() for v in history.values()])).tolist()))
        diverged = not all(math.isfinite(v) for v in losses.values())
        evaluate = ranks.lead and not diverged
        val_acc, val_loss = accuracy(student, splits.val_x, splits.val_y) if evaluate else (math.nan, math.nan)
        metrics = {"epoch": epoch + 1, "val_acc": val_acc, "val_loss": val_loss, **losses, **fixed,
                   "epoch_seconds": time.time() - started, "teacher_live_batches": ranks.total(targets.live_batches),
                   "teacher_passes": ranks.total(targets.live_samples) / n,
                   "diverged": diverged, "done": diverged or epoch + 1 == epochs}
        if epoch + 1 == epochs and evaluate:
            metrics["test_acc"] = accuracy(student, splits.test_x, splits.test_y)[0]
        checkpoint_now = not diverged and ((epoch + 1) % spec.train.checkpoint_every == 0 or epoch + 1 == epochs)

        def get_state(epoch=epoch):
            return {"student": student.state_dict(), "distiller": distiller.state_dict(),
                    "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(), "epoch": epoch + 1}
        stop = ranks.lead and report(metrics, get_state if checkpoint_now else None) is False
        if diverged or ranks.agree(stop):
            break
    return metrics
