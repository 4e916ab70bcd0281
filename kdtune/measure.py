"""What a student costs to deploy: FLOPs, latency and size, measured once per architecture.

None of the three depends on the weights, so one architecture (arch, width and kwargs) is
measured once and every trial of it shares the figures. The driver measures them, one
architecture at a time: the baselines' students (every choice of the space's student sizes)
before any trial starts, any other architecture when the searcher first samples it. Never inside
trials, where a dozen busy neighbours would distort the timings.
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
from kdtune.spec import ARCH_METRICS

MEASURED = tuple(m for m in ARCH_METRICS if m != "params")  # the deployment costs, beside the trial's own `params`
WARMUP = 10  # forwards before timing: allocator, caches and oneDNN kernels settle
SPREAD, MAX_RUN_S = 0.05, 3.0  # timing stops once the blocks' IQR is within 5% of their median, or at 3 s


def flops(model: nn.Module, sample: torch.Tensor) -> int:
    """Floating-point operations of one forward of `sample`, as torch's FlopCounterMode counts them
    (a multiply-add is two)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(sample)
    return int(counter.get_total_flops())


def latency_ms(model: nn.Module, batch: torch.Tensor, threads: int = 1) -> float:
    """The median wall time of one forward of `batch`, in milliseconds: eval mode, no grad, after
    warm-up, with `threads` intra-op threads (torch.utils.benchmark pins and restores them)."""
    from torch.utils import benchmark  # imported when timing: it pulls in torch's C++ extension loader

    timer = benchmark.Timer(stmt="with torch.no_grad(): model(batch)", globals={"model": model, "batch": batch},
                            num_threads=threads)
    timer.timeit(WARMUP)  # warm-up at the timed thread count (the Timer synchronizes CUDA itself)
    return timer.adaptive_autorange(threshold=SPREAD, max_run_time=MAX_RUN_S).median * 1e3


def model_mb(model: nn.Module) -> float:
    """The serialized size of the model's weights (torch.save of its state dict), in MB (10^6 bytes)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes / 1e6


def measure(model: nn.Module, in_shape, batch_size: int = 1, device: str = "cpu", threads: int = 1) -> dict:
    """All four figures of one model, on random inputs of the dataset's shape (none depends on the values)."""
    model = model.to(device).eval()
    sample = torch.rand(1, *in_shape, device=device)
    batch = torch.rand(batch_size, *in_shape, device=device)
    return {"params": student_params(model), "flops": flops(model, sample),
            "latency_ms": latency_ms(model, batch, threads), "model_mb": model_mb(model)}


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
    factory: Optional[Callable] = None
    cache: dict = field(default_factory=dict)
    seconds: float = 0.0  # spent measuring, in this process

    @classmethod
    def for_sweep(cls, spec, splits, factory=None) -> "Measurer":
        deploy = spec.deploy
        return cls(tuple(splits.in_shape), splits.num_classes, deploy.batch_size, deploy.device, deploy.threads,
                   factory)

    def __call__(self, student_spec) -> dict:
        key = arch_key(student_spec)
        if key not in self.cache:
            started = time.perf_counter()
            model = build_model(student_spec, self.in_shape, self.num_classes, "student", student_spec.width,
                                self.factory)
            self.cache[key] = measure(model, self.in_shape, self.batch_size, self.device, self.threads)
            self.seconds += time.perf_counter() - started
        return self.cache[key]

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
