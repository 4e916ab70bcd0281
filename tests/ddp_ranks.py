"""Two gloo ranks of tests/test_workers.py, in a module of their own: torch.multiprocessing.spawn
imports it in each rank, which then need not import Ray, MLflow or the test module."""
import os

import torch
import torch.distributed as dist
from torch import nn

from kdtune.parallel import Ranks


def bn_rank(rank: int, x: torch.Tensor, out: str) -> None:
    """One of two gloo ranks: a conv + batch-norm model's gradients and buffers after a step on its half."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getppid() % 1000))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ranks = Ranks(rank, 2)
        model = ranks.wrap(ranks.sync_batch_norm(bn_model()), torch.device("cpu"))
        model(x.chunk(2)[rank]).square().mean().backward()
        torch.save(({k: p.grad for k, p in model.module.named_parameters()}, model.module.state_dict()),
                   f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
