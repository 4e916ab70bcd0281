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
from torch.nn.modules.batchnorm import _BatchNorm
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
        are synced once at the start, not every step: batch norms keep theirs equal (GlobalBatchNorm),
        a method's state (CRD's memory banks) by its own `gather`, and copying 2 x 50k x 128 bank
        rows every step would cost more than the step."""
        ids = [device] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)

    def sync_batch_norm(self, model: nn.Module) -> nn.Module:
        """`model` with its batch norms over the global batch of all ranks (GlobalBatchNorm), in place
        below the root: a shard's statistics alone train a different model than the 1-worker trial's."""
        if self.world == 1:
            return model
        if isinstance(model, _BatchNorm) and not isinstance(model, GlobalBatchNorm):
            return GlobalBatchNorm.of(model)
        for name, child in model.named_children():
            setattr(model, name, self.sync_batch_norm(child))
        return model

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


class AllReduce(torch.autograd.Function):
    """The sum over ranks, differentiable: the gradient of each rank's input is the sum of every
    rank's gradient of the output."""

    @staticmethod
    def forward(ctx, values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        dist.all_reduce(values)
        return values

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(_BatchNorm):
    """Batch norm whose training statistics (and running averages) are those of the global batch:
    per-channel sums all-reduced with autograd, so gradients flow to every rank's inputs. On any
    device: torch's SyncBatchNorm refuses CPU modules in DistributedDataParallel (gloo). The
    parameters and buffers are BatchNorm's, under the same names, so state dicts load either way."""

    @classmethod
    def of(cls, bn: _BatchNorm) -> "GlobalBatchNorm":
        out = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        out.load_state_dict(bn.state_dict())
        return out.to(next(iter(bn.state_dict().values()), torch.empty(0)).device).train(bn.training)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {x.dim()}-D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels, dims = x.shape[1], [0, *range(2, x.dim())]
        count = x.new_tensor([x.numel() / channels])
        sums = AllReduce.apply(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        total = sums[-1]
        mean = sums[:channels] / total
        var = sums[channels:2 * channels] / total - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * total / (total - 1), factor)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y
