"""A trial's data parallelism in plain torch.distributed: which rank this process is, and the
collectives a trial needs. No Ray: Ray Train starts the processes and their process group
(kdtune.distributed), and the trial is handed a `Ranks`; one process is `Ranks()`, with no
collective at all."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    device: str = "cpu"  # where collectives' own tensors go: NCCL reduces CUDA tensors only

    @property
    def lead(self) -> bool:
        """Rank 0 evaluates, reports and checkpoints for all."""
        return self.rank == 0

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """`model` in DistributedDataParallel (gradients averaged over ranks in backward). Buffers
        are not broadcast: a method's state (CRD's memory banks) is kept equal by its own
        `gather`, and copying 2 x 50k x 128 bank rows every step would cost more than the step."""
        ids = [device] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def syncing(self, model: nn.Module, sync: bool):
        """Context of a backward: no all-reduce of gradients on an accumulating micro-batch."""
        if self.world == 1 or sync:
            return contextlib.nullcontext()
        return model.no_sync()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """`values` averaged over the ranks."""
        if self.world == 1:
            return values
        values = values.clone()
        dist.all_reduce(values)
        return values / self.world

    def total(self, value: float) -> float:
        """`value` summed over the ranks (counts of what each did)."""
        if self.world == 1:
            return value
        return self.mean(torch.tensor([float(value)], device=self.device)).item() * self.world

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's `values` (equal shapes), concatenated in rank order along dim 0."""
        if self.world == 1:
            return values
        parts = [torch.empty_like(values) for _ in range(self.world)]
        dist.all_gather(parts, values.contiguous())
        return torch.cat(parts)

    def agree(self, flag: bool) -> bool:
        """Rank 0's `flag` on every rank (whether to stop: only rank 0 hears the scheduler)."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.broadcast(value, 0)
        return bool(value.item())


class Learner(nn.Module):
    """The student and its method as one module, so that DistributedDataParallel syncs the
    gradients of both (a method's own layers: CRD's projections, FitNet's regressor)."""

    def __init__(self, student: nn.Module, distiller: nn.Module):
        super().__init__()
        self.student, self.distiller = student, distiller

    def forward(self, x, targets, labels, idx, progress):
        return self.distiller(self.student(x), targets, labels, idx, progress)
