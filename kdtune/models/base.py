"""What every built-in model shares: the `Features` it returns, the registry of families and
the staged conv net most families are.

A method asks for logits, the penultimate embedding or per-stage feature maps without
knowing the architecture; models that are not built in get the same `Features` through
named modules or graph nodes, or timm's API (kdtune.models.features, kdtune.models.timm_models).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
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


def structure(module: nn.Module) -> list[tuple[str, list[int]]]:
    """The names and shapes of the module's parameters and buffers: what a checkpoint must fit."""
    return [(name, list(tensor.shape)) for name, tensor in module.state_dict().items()]


def conv_bn(c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
            relu: bool = True, bias: bool = False) -> nn.Sequential:
    """Conv ('same' padding) - BN, then ReLU unless `relu` is False (before a residual sum)."""
    layers = [nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=bias),
              nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


def residual_stages(stem: nn.Module, c_in: int, widths: tuple[int, ...], blocks: int,
                    block: Callable[[int, int, int], nn.Module]) -> nn.ModuleList:
    """The stages of a CIFAR ResNet: `blocks` blocks at each of `widths` channels, each stage after
    the first opening with a stride-2 block; `stem` (with `c_in` output channels) opens the first."""
    stages = []
    for stage, c_out in enumerate(widths):
        layers = [stem] if stage == 0 else []
        for i in range(blocks):
            layers.append(block(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
            c_in = c_out
        stages.append(nn.Sequential(*layers))
    return nn.ModuleList(stages)


class StagedNet(nn.Module):
    """Runs `self.stages`, keeps each stage's output as a map, then `self.head` (identity unless a
    family replaces it), global average pooling (the embedding) and one Linear `fc`.

    `default_in_shape` and `default_num_classes` are the setting the family was designed for:
    what `python -m kdtune.models` builds to count its parameters.
    """

    has_maps = True
    default_in_shape: ClassVar[tuple[int, int, int]]
    default_num_classes: ClassVar[int]
    stages: nn.ModuleList
    fc: nn.Linear

    def __init__(self):
        super().__init__()
        self.head: nn.Module = nn.Identity()

    @property
    def classifier(self) -> nn.Linear:
        """The final Linear, which reads the embedding (a teacher's, for SRRL)."""
        return self.fc

    def forward(self, x: torch.Tensor) -> Features:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        embedding = torch.flatten(F.adaptive_avg_pool2d(self.head(x), 1), 1)
        return Features(self.fc(embedding), embedding, maps)


class CifarNet(StagedNet):
    """A net of the CRD benchmark's CIFAR families (3x32x32 inputs, CIFAR-100), initialised as that
    benchmark's code does: He-normal convs (fan-out), so baselines start like the published ones."""

    default_in_shape = (3, 32, 32)
    default_num_classes = 100

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
