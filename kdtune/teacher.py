"""The frozen teacher: trained once and cached, or loaded; its outputs computed once per sweep."""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdtune.datasets import Splits, batches
from kdtune.distill import TEACHER_TARGETS
from kdtune.models import build_model, count_params

# Teacher forward passes over whole splits in this process, by split name (tests read it).
FORWARD_PASSES: Counter = Counter()


class TeacherError(Exception):
    """A teacher checkpoint that is missing, unreadable or does not fit the arch."""


def cache_root(spec) -> Path:
    return Path(spec.teacher.cache_dir or os.environ.get("KDTUNE_CACHE") or Path.home() / ".cache" / "kdtune")


def teacher_config(spec) -> dict:
    """Everything the trained teacher depends on: the cache key."""
    return {"arch": spec.teacher.arch, "dataset": spec.data.dataset, "val_size": spec.data.val_size,
            "train_limit": spec.data.train_limit, "epochs": spec.teacher.epochs, "lr": spec.teacher.lr,
            "batch_size": spec.teacher.batch_size, "seed": spec.seed}


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


def _load_state(path: Path, model: nn.Module) -> dict:
    if not path.is_file():
        raise TeacherError(f"teacher checkpoint {path}: no such file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TeacherError(f"teacher checkpoint {path}: not a readable PyTorch checkpoint ({type(exc).__name__})") from None
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise TeacherError(f"teacher checkpoint {path}: expected a state_dict, got {type(blob).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = str(exc).split("\n", 1)[-1].strip().splitlines()[0]
        raise TeacherError(f"teacher checkpoint {path}: does not fit arch {model.__class__.__name__} ({detail})") from None
    return blob


def train_teacher(model: nn.Module, spec, splits: Splits, log: Callable[[str], None]) -> None:
    """The PyTorch MNIST example's recipe: Adadelta, StepLR(gamma 0.7), per-epoch progress."""
    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=spec.teacher.lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    model.train()
    for epoch in range(spec.teacher.epochs):
        start = time.time()
        for idx in batches(len(splits.train_y), spec.teacher.batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(splits.train_x[idx]).logits, splits.train_y[idx]).backward()
            optimizer.step()
        schedule.step()
        val_acc, _ = accuracy(model, splits.val_x, splits.val_y)
        log(f"teacher epoch {epoch + 1}/{spec.teacher.epochs}: val_acc {val_acc:.4f} ({time.time() - start:.0f}s)")


def get_teacher(spec, splits: Splits, log: Callable[[str], None]) -> tuple[nn.Module, dict]:
    """The frozen teacher and its facts (params, test_acc, checkpoint path, whether it was cached)."""
    model = build_model(spec.teacher.arch, splits.in_shape, splits.num_classes)
    started = time.time()
    if spec.teacher.checkpoint:
        path = Path(spec.teacher.checkpoint)
        _load_state(path, model)
        source = "given"
    else:
        config = teacher_config(spec)
        key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        path = cache_root(spec) / "teachers" / f"{spec.teacher.arch}-{spec.data.dataset}-{key}.pt"
        if path.is_file():
            _load_state(path, model)
            source = "cached"
            log(f"teacher: reusing cached checkpoint {path}")
        else:
            log(f"teacher: training {spec.teacher.arch} for {spec.teacher.epochs} epoch(s)")
            train_teacher(model, spec, splits, log)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            torch.save({"state_dict": model.state_dict(), "config": config}, partial)
            partial.replace(path)
            source = "trained"
    model.eval().requires_grad_(False)
    test_acc, _ = accuracy(model, splits.test_x, splits.test_y)
    FORWARD_PASSES["test"] += 1
    log(f"teacher: {count_params(model):,} params, test_acc {test_acc:.4f} ({source})")
    return model, {"arch": spec.teacher.arch, "params": count_params(model), "test_acc": test_acc,
                   "checkpoint": str(path), "source": source, "seconds": round(time.time() - started, 1)}


@torch.no_grad()
def compute_targets(teacher: nn.Module, x: torch.Tensor, keys: list[str], budget_mb: float,
                    split: str = "train", batch_size: int = 1000) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One teacher pass over `x`, keeping the targets that fit the memory budget (smallest first).

    Returns (cached targets, keys left to compute live in the trials)."""
    if not keys:
        return {}, []
    sample = {k: TEACHER_TARGETS[k](teacher(x[:1])) for k in keys}
    sizes = {k: v[0].numel() * 4 * len(x) / 2 ** 20 for k, v in sample.items()}
    cached, live, used = [], [], 0.0
    for key in sorted(keys, key=sizes.get):
        if used + sizes[key] <= budget_mb:
            cached.append(key)
            used += sizes[key]
        else:
            live.append(key)
    out = {k: [] for k in cached}
    if cached:
        FORWARD_PASSES[split] += 1
        for start in range(0, len(x), batch_size):
            features = teacher(x[start:start + batch_size])
            for k in cached:
                out[k].append(TEACHER_TARGETS[k](features))
    return {k: torch.cat(v) for k, v in out.items()}, live
