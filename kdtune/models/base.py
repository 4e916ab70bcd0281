"""What every built-in model shares: the `Features` it returns and the registry of families.

A method asks for logits, the penultimate embedding or per-stage feature maps without
knowing the architecture; models that are not built in get the same `Features` through
named graph nodes (kdtune.models.features).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn


@dataclass
class Features:
    logits: torch.Tensor
    embedding: Optional[torch.Tensor] = None
    maps: list[torch.Tensor] = field(default_factory=list)


# name -> class (or factory) called as factory(in_shape=(C, H, W), num_classes=N, **kwargs)
MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def add(builder):
        MODELS[name] = builder
        return builder
    return add


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
