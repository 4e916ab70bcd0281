"""What a student costs to deploy: FLOPs, latency and size, measured once per architecture.

None of the three depends on the weights, so one architecture (arch, width and kwargs) is
measured once and every trial of it shares the figures. The driver measures them: the baselines'
students (every choice of the space's student sizes) together before any trial starts, any other
architecture when the searcher first samples it. Never inside trials, where a dozen busy
neighbours would distort the timings.

Shared and virtual CPUs have slow episodes of several seconds (a ~1 ms forward takes 1.2-1.8 ms
on the project's VM), which no statistic of a short run escapes. So latency is sampled in short
blocks, round-robin over the architectures measured together, for `deploy.timing_seconds`, and
the quietest block counts: the figure is the forward's uncontended time, the same however busy
the neighbours were for part of the window.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdtune.models.features import student_params
from kdtune.models.resolve import build_model
from kdtune.spec import ARCH_METRICS, DeploySpec

MEASURED = tuple(m for m in ARCH_METRICS if m != "params")  # the deployment costs, beside the trial's own `params`
WARMUP = 10  # forwards before timing: allocator, caches and oneDNN kernels settle
BLOCK_S = 0.01  # one timed block: short beside a slow episode, long beside the clock's resolution


def flops(model: nn.Module, sample: torch.Tensor) -> int:
    """Floating-point operations of one forward of `sample`, as torch's FlopCounterMode counts them
    (a multiply-add is two)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(sample)
    return int(counter.get_total_flops())


def quietest_ms(timers: dict, seconds: float) -> dict:
    """Each torch.utils.benchmark Timer's run time in its quietest block, in milliseconds: after
    warm-up, blocks of about BLOCK_S alternate between the timers for `seconds` (at least three
    rounds); a block's figure is its mean run."""
    number = {}
    for name, timer in timers.items():
        warm = timer.timeit(WARMUP)  # the Timer synchronizes CUDA itself
        number[name] = max(1, round(BLOCK_S / warm.mean))
    best = dict.fromkeys(timers, float("inf"))
    started, rounds = time.perf_counter(), 0
    while rounds < 3 or time.perf_counter() - started < seconds:
        for name, timer in timers.items():
            best[name] = min(best[name], timer.timeit(number[name]).mean)
        rounds += 1
    return {name: value * 1e3 for name, value in best.items()}


def latencies(models: dict, batch: torch.Tensor, threads: int, seconds: float) -> dict:
    """One forward's wall time of `batch` through each model in its quietest block (`quietest_ms`),
    in milliseconds: eval mode, no grad, with `threads` intra-op threads (torch.utils.benchmark
    pins and restores them)."""
    from torch.utils import benchmark  # imported when timing: it pulls in torch's C++ extension loader

    return quietest_ms({name: benchmark.Timer(stmt="with torch.no_grad(): model(batch)",
                                              globals={"model": model, "batch": batch}, num_threads=threads)
                        for name, model in models.items()}, seconds)


def model_mb(model: nn.Module) -> float:
    """The serialized size of the model's weights (torch.save of its state dict), in MB (10^6 bytes)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes / 1e6


def measure_all(models: dict, in_shape, batch_size: int, device: str, threads: int, seconds: float) -> dict:
    """All four figures of each model, on random inputs of the dataset's shape (none depends on
    the values); their latencies are timed together (`latencies`)."""
    models = {name: model.to(device).eval() for name, model in models.items()}
    sample = torch.rand(1, *in_shape, device=device)
    batch = torch.rand(batch_size, *in_shape, device=device)
    timed = latencies(models, batch, threads, seconds)
    return {name: {"params": student_params(model), "flops": flops(model, sample), "latency_ms": timed[name],
                   "model_mb": model_mb(model)} for name, model in models.items()}


def arch_key(student_spec) -> str:
    """One architecture: the student's arch, width and kwargs (a resolved spec's `student`)."""
    return json.dumps(student_spec.model_dump(mode="json"), sort_keys=True, default=str)


@dataclass
class Measurer:
    """The driver's figures per architecture, each measured once: students of `in_shape` images and
    `num_classes` classes (`factory`: the student factory given to kdtune.run), at the spec's
    `deploy` settings."""

    in_shape: tuple
    num_classes: int
    batch_size: int = 1
    device: str = "cpu"
    threads: int = 1
    timing_seconds: float = DeploySpec().timing_seconds
    factory: Optional[Callable] = None
    cache: dict = field(default_factory=dict)
    seconds: float = 0.0  # spent measuring, in this process

    @classmethod
    def for_sweep(cls, spec, splits, factory=None) -> "Measurer":
        deploy = spec.deploy
        return cls(tuple(splits.in_shape), splits.num_classes, deploy.batch_size, deploy.device, deploy.threads,
                   deploy.timing_seconds, factory)

    def __call__(self, student_spec) -> dict:
        return self.measure_all([student_spec])[arch_key(student_spec)]

    def measure_all(self, student_specs) -> dict:
        """The figures of each student spec's architecture, by arch_key; those not yet cached are
        measured together."""
        specs = {arch_key(s): s for s in student_specs}
        new = {key: s for key, s in specs.items() if key not in self.cache}
        if new:
            started = time.perf_counter()
            models = {key: build_model(s, self.in_shape, self.num_classes, "student", s.width, self.factory)
                      for key, s in new.items()}
            self.cache.update(measure_all(models, self.in_shape, self.batch_size, self.device, self.threads,
                                          self.timing_seconds))
            self.seconds += time.perf_counter() - started
        return {key: self.cache[key] for key in specs}

    def __getstate__(self):  # Tune snapshots the searcher with plain pickle: the figures go, a user's factory not
        return {**self.__dict__, "factory": None}


def violations(measures: dict, constraints) -> list[float]:
    """Optuna's constraint values for one trial: one per bound, > 0 by how much it is exceeded,
    <= 0 when it holds."""
    found = []
    for c in constraints:
        value = float(measures[c.metric])
        if c.max is not None:
            found.append(value - c.max)
        if c.min is not None:
            found.append(c.min - value)
    return found


def feasible(measures: dict, constraints) -> bool:
    return all(v <= 0 for v in violations(measures, constraints))
