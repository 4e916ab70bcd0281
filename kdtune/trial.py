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
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdtune.data import Splits, batches
from kdtune.data.augment import Augment
from kdtune.data.stream import Stream, seed_rngs
from kdtune.teacher_outputs import DiskOutputs
from kdtune.distill import INPUTS, METHODS, TEACHER_TARGETS
from kdtune.evaluation import OnDevice, loader, score
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


def scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, evaluate: Optional[Callable] = None) -> dict[str, float]:
    """A resident split's metrics by name (see `with_accuracy`)."""
    return with_accuracy(model, loader(x, y), evaluate, lambda: accuracy(model, x, y))


def with_accuracy(model: nn.Module, batches, evaluate: Optional[Callable], accuracy_of: Callable) -> dict[str, float]:
    """kdtune's accuracy and mean cross-entropy (`acc`, `loss`, from `accuracy_of()`); with the user's
    `evaluate` function, its metrics on `batches`, and kdtune's two first unless it returns `acc`
    itself (every table reads acc, and a second pass over the split is then not needed)."""
    found = score(model, batches, evaluate) if evaluate is not None else {}
    if "acc" not in found:
        acc, loss = accuracy_of()
        found = {"acc": acc, "loss": loss, **found}
    return found


@torch.no_grad()
def loader_accuracy(model: nn.Module, loader, device) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of a model returning Features over a DataLoader of
    (images, labels): the streamed path's evaluation."""
    was_training = model.training
    model.eval()
    correct, loss, seen = 0, 0.0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x).logits
        correct += (logits.argmax(1) == y).sum().item()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        seen += len(y)
    model.train(was_training)
    return correct / seen, loss / seen


def numpy_targets(targets: dict[str, torch.Tensor]) -> dict:
    return {k: v.numpy() for k, v in targets.items()}


def torch_targets(targets: dict) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():  # the shared buffers are read-only, and trials only read them
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return {k: torch.from_numpy(v) for k, v in targets.items()}


@dataclass
class TeacherData:
    """One named teacher's share of the sweep data (kdtune.teachers): as SweepData's teacher
    fields. An ensemble's `logits` are its members' (N x [views x] members x classes), mixed in
    each trial at its method's temperature with `weights` (they sum to 1)."""

    targets: dict[str, torch.Tensor]
    teacher: Optional[nn.Module] = field(repr=False, default=None)
    per_view: bool = False
    teacher_head: Optional[nn.Module] = field(repr=False, default=None)
    outputs: Optional[DiskOutputs] = field(repr=False, default=None)
    weights: Optional[tuple[float, ...]] = None

    def __getstate__(self):
        return {**self.__dict__, "targets": numpy_targets(self.targets)}

    def __setstate__(self, state):
        self.__dict__.update(state, targets=torch_targets(state["targets"]))

    def to(self, device) -> "TeacherData":
        teacher, head = (m.to(device) if m is not None else None for m in (self.teacher, self.teacher_head))
        return TeacherData({k: v.to(device) for k, v in self.targets.items()}, teacher, self.per_view, head,
                           self.outputs, self.weights)


def ensemble_logits(members: torch.Tensor, weights: tuple[float, ...], temperature: float) -> torch.Tensor:
    """Logits z whose softmax(z / T) is the weighted mean of the members' softmax(logits / T)
    (members on dim -2): what a method reading teacher logits at temperature T distils from."""
    w = torch.tensor(weights, device=members.device, dtype=torch.float32)[:, None]
    mean = (F.softmax(members.float() / temperature, dim=-1) * w).sum(-2)
    return temperature * mean.clamp_min(1e-12).log()


@dataclass
class SweepData:
    """What every trial shares, computed once per sweep: the splits and the teacher's cached
    train-set targets, the frozen teacher itself for targets too large to cache, the teacher's
    frozen classifier head for methods that reuse it (one layer, not the teacher's body), the
    student factory given to kdtune.run (for `student.arch: python:...`) and the user's evaluation
    function (`evaluate`; None: kdtune's accuracy)."""

    splits: Splits
    targets: dict[str, torch.Tensor]
    teacher: Optional[nn.Module] = field(repr=False, default=None)
    student_factory: Optional[Callable] = field(repr=False, default=None)
    per_view: bool = False  # targets hold every augmented view of each image: N x views x ...
    teacher_head: Optional[nn.Module] = field(repr=False, default=None)
    evaluate: Optional[Callable] = field(repr=False, default=None)
    # streamed data: the datasets (splits then holds a few probe images of each) and the
    # teacher's outputs on disk, read by sample index
    stream: Optional[Stream] = field(repr=False, default=None)
    outputs: Optional[DiskOutputs] = field(repr=False, default=None)
    # with several named teachers, each one a trial may choose (the fields above: the default's)
    teachers: dict[str, TeacherData] = field(default_factory=dict)
    weights: Optional[tuple[float, ...]] = None  # the targets are an ensemble's (TeacherData)

    @property
    def train_size(self) -> int:
        return len(self.stream.train) if self.stream is not None else len(self.splits.train_y)

    def __getstate__(self):
        """Tensors travel as numpy arrays: Ray maps those from its object store without a
        copy, so a trial starts without unpickling hundreds of MB of data."""
        return {**self.__dict__, "splits": self.splits.map(torch.Tensor.numpy), "targets": numpy_targets(self.targets)}

    def __setstate__(self, state):
        with warnings.catch_warnings():  # the shared buffers are read-only, and trials only read them
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            splits = state.pop("splits").map(torch.from_numpy)
        self.__dict__.update(state, splits=splits, targets=torch_targets(state.pop("targets")))

    def to(self, device) -> "SweepData":
        moved = self.splits.map(lambda t: t.to(device))
        teacher, head = (m.to(device) if m is not None else None for m in (self.teacher, self.teacher_head))
        return SweepData(moved, {k: v.to(device) for k, v in self.targets.items()}, teacher, self.student_factory,
                         self.per_view, head, self.evaluate, self.stream, self.outputs,
                         {name: t.to(device) for name, t in self.teachers.items()}, self.weights)

    def for_teacher(self, name: Optional[str]) -> "SweepData":
        """The data with the named teacher's targets as its own (unchanged for the default one)."""
        if name not in self.teachers:
            return self
        t = self.teachers[name]
        return replace(self, targets=t.targets, teacher=t.teacher, per_view=t.per_view, teacher_head=t.teacher_head,
                       outputs=t.outputs, weights=t.weights, teachers={})

    def split_scores(self, model: nn.Module, split: str, device) -> dict[str, float]:
        """`scores` of `model` on the validation or test data ("val" or "test"), resident or
        streamed. With several named validation sets, `acc`, `loss` and the `evaluate` function's
        metrics are the first one's, and each set also gives `acc_<name>`."""
        if self.stream is None:
            x, y = (self.splits.val_x, self.splits.val_y) if split == "val" else (self.splits.test_x, self.splits.test_y)
            return scores(model, x, y, self.evaluate)
        (first, loader_), *others = self.stream.eval_loaders(split, device=device).items()
        found = with_accuracy(model, OnDevice(loader_, device), self.evaluate,
                              lambda: loader_accuracy(model, loader_, device))
        if others:
            found.update({f"acc_{first}": found["acc"],
                          **{f"acc_{name}": loader_accuracy(model, other, device)[0] for name, other in others}})
        return found


def build_student(spec, data: SweepData) -> nn.Module:
    """The student of a (resolved) spec, built as every trial builds it: a built-in family,
    `torchvision:`, an import path, or the factory given to kdtune.run."""
    splits = data.splits
    return build_model(spec.student, splits.in_shape, splits.num_classes, "student", spec.student.width,
                       data.student_factory)


class TeacherTargets:
    """Serves a batch's teacher targets: cached rows by dataset index (and, for a cache of every
    augmented view, by the view each image was given), the rest by a live forward."""

    def __init__(self, data: SweepData, keys: tuple[str, ...], device, temperature: float = 1.0,
                 inputs: bool = False):
        self.weights, self.temperature, self.inputs = data.weights, temperature, inputs
        self.cached = {k: data.targets[k] for k in keys if k in data.targets}
        if self.weights is not None and "logits" in self.cached:  # an ensemble's: mixed once for the trial
            self.cached["logits"] = torch.cat([ensemble_logits(rows, self.weights, temperature)
                                               for rows in self.cached["logits"].split(8192)])
        self.on_disk = [k for k in keys if data.outputs is not None and k in data.outputs.keys]
        self.outputs, self.device = data.outputs, device
        self.live = [k for k in keys if k not in data.targets and k not in self.on_disk]
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
        if self.on_disk:
            out.update(self.outputs.read(self.on_disk, idx, self.device))
        if self.live:
            self.live_batches += 1
            self.live_samples += len(idx)
            with torch.no_grad():
                features = self.teacher(x)
            out.update({k: TEACHER_TARGETS[k](features) for k in self.live})
        if self.weights is not None and "logits" not in self.cached:  # members' logits from disk or a forward
            out["logits"] = ensemble_logits(out["logits"], self.weights, self.temperature)
        if self.inputs:
            out[INPUTS] = x
        return out


def method_temperature(plan: TrialPlan) -> float:
    """The temperature the plan's method reads the teacher at (1 for a method without one)."""
    param = METHODS[plan.method].params.get("temperature")
    return plan.method_params.get("temperature", param.default) if param else 1.0


def own_scores(distiller: nn.Module, data: SweepData, device) -> dict[str, float]:
    """val_acc_<name> of each model the method trains of its own (dml's peers, byot's heads)."""
    return {f"val_acc_{name}": data.split_scores(model, "val", device)["acc"]
            for name, model in distiller.evaluated().items()}


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


class ResidentBatches:
    """An epoch over resident tensors: (indices, images, labels) by a seeded permutation."""

    def __init__(self, splits: Splits, order: tuple[torch.Tensor, ...]):
        self.splits, self.order = splits, order

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        x, y = self.splits.train_x, self.splits.train_y
        for idx in self.order:
            yield idx, x.index_select(0, idx), y.index_select(0, idx)  # 2x faster than [idx] on CPU


class StreamedBatches:
    """An epoch of a streamed training set: (indices, images, labels) moved to the trial's device."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y, idx in self.loader:
            yield (idx.to(self.device, non_blocking=True), x.to(self.device, non_blocking=True),
                   y.to(self.device, non_blocking=True))


def train_batches(data: SweepData, batch_size: int, generator: torch.Generator, seed: int, epoch: int, device,
                  ranks: Ranks):
    """One epoch's training batches of this rank's shard: from resident tensors, or streamed in an
    order fixed by (seed, epoch)."""
    if data.stream is None:
        return ResidentBatches(data.splits, batches(data.train_size, batch_size, generator, device, ranks.rank,
                                                    ranks.world))
    return StreamedBatches(data.stream.train_loader(batch_size, seed, epoch, device, ranks.rank, ranks.world),
                           device)


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
    student = ranks.sync_batch_norm(to_device(student if student is not None else build_student(spec, data), device))
    augment = Augment.of(spec.data.augment, splits)
    method = METHODS[plan.method]
    data = data.for_teacher(plan.teacher)
    targets = TeacherTargets(data, method.teacher_keys, device, method_temperature(plan), method.needs_inputs)
    probe = torch.arange(2, device=device)
    student.eval()  # the shape probe must not move batch-norm statistics
    with torch.no_grad():
        distiller = method(student(splits.train_x[probe]), targets(probe, splits.train_x[probe]),
                           data.train_size, spec.train.ce_weight, label_smoothing=spec.train.label_smoothing,
                           teacher_head=data.teacher_head, student_model=student, **plan.method_params).to(device)
    targets.live_batches = targets.live_samples = 0
    distiller.gather = ranks.gather  # a method with state (CRD's banks) updates it with every rank's batch
    epochs, n, accumulate = spec.train.epochs, data.train_size, spec.train.accumulate
    if data.stream is not None:
        seed_rngs(plan.seed)  # a user's numpy or `random` transform read in this process
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
        order = train_batches(data, spec.train.batch_size, generator, plan.seed, epoch, device, ranks)
        for step, (idx, x, y) in enumerate(order):
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
        val = data.split_scores(student, "val", device) if evaluate else {"acc": math.nan, "loss": math.nan}
        own = own_scores(distiller, data, device) if evaluate else {}
        metrics = {"epoch": epoch + 1, **{f"val_{k}": v for k, v in val.items()}, **own, **losses, **fixed,
                   "epoch_seconds": time.time() - started, "teacher_live_batches": ranks.total(targets.live_batches),
                   "teacher_passes": ranks.total(targets.live_samples) / n,
                   "diverged": diverged, "done": diverged or epoch + 1 == epochs}
        if epoch + 1 == epochs and evaluate:  # no test_loss: the tables report test accuracy, not the loss
            test = data.split_scores(student, "test", device)
            metrics.update({f"test_{k}": v for k, v in test.items() if k != "loss"})
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
