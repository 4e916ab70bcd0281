"""The frozen teacher: given, loaded from a checkpoint, or trained once and cached; its
outputs computed once per sweep."""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from kdtune.data import Splits
from kdtune.data.augment import Augment
from kdtune.data.stream import Stream
from kdtune.distill import TEACHER_TARGETS
from kdtune.errors import SpecError, TeacherError
from kdtune.models.base import structure
from kdtune.models.features import student_params, unwrapped
from kdtune.models.resolve import attach_features, build_model
from kdtune.space import TrialPlan
from kdtune.spec import Spec
from kdtune.teacher_outputs import DiskOutputs, sizes_mb, write_outputs
from kdtune.trial import SweepData, accuracy, loader_accuracy, run_trial

# Teacher forward passes over whole splits in this process, by split name (tests read it).
FORWARD_PASSES: Counter = Counter()


def cache_root(spec) -> Path:
    return Path(spec.teacher.cache_dir or os.environ.get("KDTUNE_CACHE") or Path.home() / ".cache" / "kdtune")


def teacher_config(spec) -> dict:
    """Everything the trained teacher depends on: the cache key."""
    t = spec.teacher
    return {"arch": t.arch, "kwargs": t.kwargs, "dataset": spec.data.dataset, "val_size": spec.data.val_size,
            "train_limit": spec.data.train_limit, "epochs": t.epochs, "lr": t.lr, "batch_size": t.batch_size,
            "optimizer": t.optimizer, "momentum": t.momentum, "weight_decay": t.weight_decay,
            "schedule": t.schedule.model_dump(), "augment": t.augment.model_dump(), "seed": spec.seed}


def _read_checkpoint(path: Path):
    """A state_dict (bare or under 'state_dict'), or a whole saved module."""
    if not path.is_file():
        raise TeacherError(f"teacher.checkpoint: {path}: no such file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:  # a whole pickled module needs full unpickling: the user's own file
            blob = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise TeacherError(f"teacher.checkpoint: {path}: not a readable PyTorch checkpoint "
                               f"({type(exc).__name__})") from None
    if isinstance(blob, nn.Module):
        return blob.state_dict()
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise TeacherError(f"teacher.checkpoint: {path}: expected a state_dict or a saved module, got {type(blob).__name__}")
    return state


def _load_state(path: Path, model: nn.Module) -> None:
    """Load a checkpoint into the user's own module; a mismatch names the keys that do not fit."""
    state = _read_checkpoint(path)
    target = unwrapped(model)
    try:
        result = target.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        detail = str(exc).split("\n", 1)[-1].strip().splitlines()[0]
        raise TeacherError(f"teacher.checkpoint: {path}: does not fit arch {type(target).__name__} ({detail})") from None
    problems = [f"{what} keys: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                for what, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys]
    if problems:
        raise TeacherError(f"teacher.checkpoint: {path}: does not fit arch {type(target).__name__} ({'; '.join(problems)})")


@dataclass
class Distil:
    """How an assistant trains: KD from its named teacher (the `source` config its cache key
    includes), with that teacher's train-set targets made only when it does train."""

    source: dict
    temperature: float
    alpha: float
    data: Callable[[], SweepData]

    @property
    def config(self) -> dict:
        return {"distil_from": self.source, "temperature": self.temperature, "alpha": self.alpha}


def teacher_plan(spec, distil: Optional[Distil] = None) -> TrialPlan:
    """Training the teacher as a trial with no teacher (an assistant: with KD from its own): its
    model as the student, its recipe as the training settings, its augmentation as the data's."""
    t = spec.teacher
    raw = spec.model_dump(mode="python")
    raw["student"] = {"arch": t.arch, "kwargs": t.kwargs, "features": raw["teacher"]["features"], "width": None}
    raw["train"].update(epochs=t.epochs, batch_size=t.batch_size, optimizer=t.optimizer, lr=t.lr,
                        momentum=t.momentum, weight_decay=t.weight_decay, schedule=raw["teacher"]["schedule"],
                        label_smoothing=0.0, ce_weight=1.0, checkpoint_every=t.epochs)
    raw["data"]["augment"] = raw["teacher"]["augment"]
    raw["search"]["space"] = {}
    if distil is None:
        return TrialPlan(Spec.model_validate(raw), "none", {}, spec.seed)
    return TrialPlan(Spec.model_validate(raw), "kd", {"temperature": distil.temperature, "alpha": distil.alpha},
                     spec.seed)


def driver_device(spec) -> torch.device:
    """Where the sweep's own process trains the teacher and computes its outputs: a GPU when the
    trials get one (`resources.gpu`) and this process sees one, else the CPU. With a CIFAR teacher
    that is most of a sweep's teacher work (240 epochs, then one pass per augmented view)."""
    return torch.device("cuda" if spec.resources.gpu > 0 and torch.cuda.is_available() else "cpu")


@contextmanager
def on_device(model: nn.Module, device: torch.device):
    """`model` on `device` for the block, then back on the CPU, where the driver keeps and ships it;
    the GPU memory it cached goes back to the trials."""
    try:
        yield model.to(device)
    finally:
        model.cpu()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def train_teacher(model: nn.Module, spec, splits: Splits, log: Callable[[str], None],
                  stream: Optional[Stream] = None, distil: Optional[Distil] = None) -> None:
    """Train `model` in place with the teacher's recipe, through the trial's own training path, on
    the driver's device and a trial's share of threads (`resources.cpu`): more threads than cores
    spin rather than work."""
    def report(metrics: dict, _get_state) -> None:
        log(f"teacher epoch {metrics['epoch']}/{spec.teacher.epochs}: val_acc {metrics['val_acc']:.4f} "
            f"({metrics['epoch_seconds']:.0f}s)")

    device = driver_device(spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(spec.resources.cpu)))
    try:
        with on_device(model, device):
            data = distil.data() if distil else SweepData(splits, {}, stream=stream)
            run_trial(teacher_plan(spec, distil), data.to(device), report, device=device, student=model)
    finally:
        torch.set_num_threads(threads)


def _cached_or_trained(spec, model: nn.Module, splits: Splits, log, stream: Optional[Stream],
                       distil: Optional[Distil] = None) -> tuple[str, str]:
    """Load the spec's teacher from the cache, or train and cache it: (source, checkpoint path).
    The key holds the model's structure too: a class edited under the same import path is
    trained anew, and a cached file that still does not load is set aside and replaced."""
    config = {**teacher_config(spec), **(distil.config if distil else {})}
    keyed = {**config, "structure": structure(unwrapped(model))}
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]
    name = spec.teacher.arch.replace(":", "-").replace("/", "-")
    path = cache_root(spec) / "teachers" / f"{name}-{spec.data.dataset.replace(':', '-')}-{key}.pt"
    if path.is_file():
        initial = {k: v.clone() for k, v in unwrapped(model).state_dict().items()}
        try:
            _load_state(path, model)
            log(f"teacher: reusing cached checkpoint {path}")
            return "cached", str(path)
        except TeacherError as exc:
            unwrapped(model).load_state_dict(initial)  # a failed load may have filled some tensors
            aside = path.with_suffix(f".unloadable-{int(time.time())}.pt")
            path.replace(aside)
            log(f"teacher: cached checkpoint does not load ({str(exc).split(': ', 2)[-1]}); set aside as {aside}")
    log(f"teacher: training {spec.teacher.arch} for {spec.teacher.epochs} epoch(s)")
    train_teacher(model, spec, splits, log, stream, distil)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save({"state_dict": unwrapped(model).state_dict(), "config": config}, partial)
    partial.replace(path)
    return "trained", str(path)


def get_teacher(spec, splits: Splits, log: Callable[[str], None],
                given: Union[nn.Module, Callable, None] = None, stream: Optional[Stream] = None,
                distil: Optional[Distil] = None) -> tuple[nn.Module, dict]:
    """The frozen teacher and its facts (params, test_acc, where it came from).

    `given` (from kdtune.run) is a trained module, used as is, or a factory to train from; with
    `distil`, the teacher is an assistant, trained (once, then cached) by KD from its own.
    With a `stream`, `splits` holds only probe images: training and the test score stream."""
    started = time.time()
    path = None
    if isinstance(given, nn.Module):
        model, source = attach_features(given, spec.teacher.features, "teacher"), "given"
    else:
        torch.manual_seed(spec.seed)  # the teacher's initialisation, like a trial's
        model = build_model(spec.teacher, splits.in_shape, splits.num_classes, "teacher", given=given)
        if spec.teacher.checkpoint:
            path, source = spec.teacher.checkpoint, "checkpoint"
            _load_state(Path(path), model)
        elif given is not None:  # an in-memory factory has no stable identity to cache under
            log(f"teacher: training the given factory for {spec.teacher.epochs} epoch(s)")
            train_teacher(model, spec, splits, log, stream)
            source = "trained"
        else:
            source, path = _cached_or_trained(spec, model, splits, log, stream, distil)
    model.eval().requires_grad_(False)
    if stream is None:
        test_acc, _ = accuracy(model, splits.test_x, splits.test_y)
    else:
        device = driver_device(spec)
        with on_device(model, device):
            test_acc, _ = loader_accuracy(model, stream.eval_loaders("test", device=device)["test"], device)
    FORWARD_PASSES["test"] += 1
    params = student_params(model)
    log(f"teacher: {params:,} params, test_acc {test_acc:.4f} ({source})")
    return model, {"arch": spec.teacher.arch, "params": params, "test_acc": test_acc,
                   "checkpoint": path, "source": source, "seconds": round(time.time() - started, 1),
                   **({"recipe": teacher_config(spec)} if source in ("trained", "cached") else {})}


def within_budget(sizes_mb: dict[str, float], budget_mb: float) -> list[str]:
    """The targets to cache: smallest first, while together they fit the budget."""
    chosen, used = [], 0.0
    for key in sorted(sizes_mb, key=sizes_mb.get):
        if used + sizes_mb[key] <= budget_mb:
            chosen.append(key)
            used += sizes_mb[key]
    return chosen


@torch.no_grad()
def compute_targets(teacher: nn.Module, x: torch.Tensor, keys: list[str], budget_mb: float,
                    split: str = "train", batch_size: int = 1000,
                    device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], list[str]]:
    """One teacher pass over `x` (the teacher on `device`, batches moved there), keeping the targets
    that fit the memory budget (smallest first), on the CPU.

    Returns (cached targets, keys left to compute live in the trials)."""
    if not keys:
        return {}, []
    sample = {k: TEACHER_TARGETS[k](teacher(x[:1].to(device))) for k in keys}
    sizes = {k: v[0].numel() * 4 * len(x) / 2 ** 20 for k, v in sample.items()}
    cached = within_budget(sizes, budget_mb)
    live = [k for k in sorted(keys, key=sizes.get) if k not in cached]
    out = {k: [] for k in cached}
    if cached:
        FORWARD_PASSES[split] += 1
        for start in range(0, len(x), batch_size):
            features = teacher(x[start:start + batch_size].to(device))
            for k in cached:
                out[k].append(TEACHER_TARGETS[k](features).cpu())
    return {k: torch.cat(v) for k, v in out.items()}, live


@torch.no_grad()
def compute_view_targets(teacher: nn.Module, x: torch.Tensor, augment: Augment, keys: list[str],
                         batch_size: int = 1000, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The teacher's targets `keys` for every augmented view of every image, each N x views x ...
    in fp16 on the CPU (the teacher on `device`): one pass over the set per view, after which any
    trial's batch reads the exact view it drew."""
    out: dict[str, torch.Tensor] = {}
    for view in range(augment.num_views):
        FORWARD_PASSES["train"] += 1
        for start in range(0, len(x), batch_size):
            chunk = x[start:start + batch_size].to(device)
            features = teacher(augment.apply(chunk, torch.full((len(chunk),), view, device=device)))
            for key in keys:
                value = TEACHER_TARGETS[key](features)
                if key not in out:
                    out[key] = torch.empty(len(x), augment.num_views, *value.shape[1:], dtype=torch.float16)
                out[key][start:start + len(chunk), view] = value.half().cpu()
    return out


def teacher_targets(spec, teacher: nn.Module, splits: Splits, keys: list[str]) -> tuple[dict, list, bool, str]:
    """The teacher's train-set targets for every trial, by `teacher.cache`: (cached targets, keys
    left live, whether the cache holds every augmented view, the mode used).

    Without augmentation, `outputs` (and `auto`) cache one row per image. With it, a per-image
    row would be the wrong view, so `augmentations` caches every view of the targets that fit
    `teacher.cache_mb` (smallest first: logits, then embeddings; larger ones run live); `auto`
    does so when that costs fewer teacher passes than the sampled trials' epochs would run live
    (so a short sweep, --smoke among them, runs the teacher live). Under `live` all run live."""
    mode, augment = spec.teacher.cache, Augment.of(spec.data.augment, splits)
    if mode == "live" or not keys:
        return {}, list(keys), False, "live" if keys else "none"
    device = driver_device(spec)
    if augment is None:
        with on_device(teacher, device):
            targets, live = compute_targets(teacher, splits.train_x, keys, spec.teacher.feature_cache_mb, device=device)
        return targets, live, False, "outputs"
    if mode == "outputs":
        raise SpecError("teacher.cache", "outputs caches each image's un-augmented outputs, but data.augment "
                                         "changes the images every batch; use augmentations, live or auto")
    with torch.no_grad():
        probe = teacher(splits.train_x[:1])
    sizes = {k: len(splits.train_y) * augment.num_views * TEACHER_TARGETS[k](probe)[0].numel() * 2 / 2 ** 20
             for k in keys}
    fitting = within_budget(sizes, spec.teacher.cache_mb)
    cheaper = mode == "augmentations" or augment.num_views <= spec.search.num_samples * spec.train.epochs
    if fitting and cheaper:
        with on_device(teacher, device):
            targets = compute_view_targets(teacher, splits.train_x, augment, fitting, device=device)
        return targets, [k for k in keys if k not in fitting], True, "augmentations"
    if mode == "augmentations":
        smallest = min(keys, key=sizes.get)
        raise SpecError("teacher.cache_mb", f"the {smallest} of all {augment.num_views} views take "
                                            f"{sizes[smallest]:.0f} MB, over {spec.teacher.cache_mb:g}; raise it, "
                                            "or use teacher.cache: live")
    return {}, list(keys), False, "live"


@torch.no_grad()
def streamed_targets(spec, teacher: nn.Module, splits: Splits, stream: Stream, keys: list[str],
                     folder: Path) -> tuple[Optional[DiskOutputs], list[str], str, str]:
    """The teacher's train-set targets for streamed data, by `teacher.cache`: (the outputs written
    to memory-mapped files in `folder`, keys left live, the mode used, why).

    Without a random transform (and without data.augment) `auto` and `outputs` write the targets
    that fit `teacher.cache_mb` on disk (smallest first), in one teacher pass over the set; the
    trials read them by sample index. A random transform in the user's `__getitem__` changes the
    images on every read, so the teacher runs live in the trials (`live`)."""
    if not keys:
        return None, [], "none", "no method reads the teacher"
    mode = spec.teacher.cache
    changing = ("the training set's __getitem__ applies a random transform" if stream.random else
                "data.augment changes the images every batch" if Augment.of(spec.data.augment, splits) else None)
    if mode == "live":
        return None, list(keys), "live", "teacher.cache: live"
    if changing:
        if mode != "auto":
            raise SpecError("teacher.cache", f"{mode} caches each image's outputs once, but {changing}; "
                                             "use live or auto")
        return None, list(keys), "live", changing
    shapes = {k: tuple(TEACHER_TARGETS[k](teacher(splits.train_x[:1]))[0].shape) for k in keys}
    count = len(stream.train)
    fitting = within_budget(sizes_mb(shapes, count, spec.teacher.topk), spec.teacher.cache_mb)
    if not fitting:
        return None, list(keys), "live", f"no target fits teacher.cache_mb ({spec.teacher.cache_mb:g} MB) on disk"
    device = driver_device(spec)
    FORWARD_PASSES["train"] += 1
    with on_device(teacher, device):
        outputs = write_outputs(teacher, stream.in_order(spec.teacher.batch_size, device), count,
                                {k: shapes[k] for k in fitting}, folder, spec.teacher.topk, device)
    return outputs, [k for k in keys if k not in fitting], "outputs", f"written once to {folder}"
