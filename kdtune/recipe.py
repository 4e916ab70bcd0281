"""The training recipe of a trial (or the teacher): optimizer and per-step learning-rate schedule.

Schedules are stepped once per optimizer step, so a fractional `warmup_epochs` and a
one-cycle schedule work at any batch size; `step` decays at whole-epoch milestones.
"""
from __future__ import annotations

import math

import torch

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
              "adadelta": torch.optim.Adadelta}


def make_optimizer(train, params) -> torch.optim.Optimizer:
    """`train.optimizer` over `params`, with the recipe's momentum and weight decay where it takes them."""
    kwargs = {"lr": train.lr, "weight_decay": train.weight_decay}
    if train.optimizer == "sgd":
        kwargs.update(momentum=train.momentum, nesterov=train.nesterov and train.momentum > 0)
    if train.optimizer in ("adam", "adamw", "sgd"):
        kwargs["fused"] = True  # one kernel per step instead of one per tensor: per-step overhead is the wall
    return OPTIMIZERS[train.optimizer](params, **kwargs)


def lr_factor(schedule, epochs: int, step: int, steps_per_epoch: int) -> float:
    """The learning rate at optimizer step `step`, as a fraction of `train.lr` (not one-cycle)."""
    warmup = schedule.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if schedule.type == "cosine":
        total = epochs * steps_per_epoch
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1.0, total - warmup)))
    if schedule.type == "step":
        epoch = step // steps_per_epoch
        return schedule.gamma ** sum(epoch >= m for m in schedule.milestones)
    return 1.0


def make_schedule(train, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """The LR scheduler for `train.schedule`, to step after every optimizer step."""
    schedule = train.schedule
    if schedule.type == "onecycle":  # torch's: warm-up share from warmup_epochs (its default 0.3 without)
        share = schedule.warmup_epochs / train.epochs if schedule.warmup_epochs else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=train.lr, total_steps=train.epochs * steps_per_epoch,
                                                   pct_start=min(share, 0.99))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(schedule, train.epochs, step, steps_per_epoch))
