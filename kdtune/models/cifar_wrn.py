"""Wide ResNets of the CRD benchmark: `wrn_16_1`, `wrn_16_2`, `wrn_40_1`, `wrn_40_2` (WRN-depth-k).

Zagoruyko & Komodakis' design: a 16-channel 3x3 stem conv, then three stages of (depth - 4) / 6
pre-activation blocks at 32x32, 16x16 and 8x8, then BN-ReLU before pooling. A block whose input
and output shapes differ projects its shortcut with a 1x1 conv of the pre-activated input. Each
stage's output (a pre-activation sum) is a map.

`width` is the base width: the first stage's channels w = 16k, the stages having (w, 2w, 4w);
the stem stays at 16 channels as in the paper for every k. Unset, it is the name's k: wrn_40_2
has w = 32 (2,255,156 parameters on CIFAR-100), wrn_16_2 w = 32 (703,284).
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import nn

from kdtune.models.base import CifarNet, conv_bn, register_model, residual_stages

STEM = 16


def bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus the input (or a 1x1 conv of the pre-activated input)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.pre = bn_relu(c_in)
        self.body = nn.Sequential(conv_bn(c_in, c_out, stride=stride),
                                  nn.Conv2d(c_out, c_out, 3, padding=1, bias=False))
        self.projection = (None if stride == 1 and c_in == c_out
                           else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.pre(x)
        return self.body(activated) + (x if self.projection is None else self.projection(activated))


class WideResNet(CifarNet):
    """Stem conv3x3 (16) | n blocks (w) | n blocks, stride 2 (2w) | the same (4w) | BN-ReLU | GAP | Linear."""

    depth: ClassVar[int]
    widen: ClassVar[int]

    def __init__(self, in_shape, num_classes, width: Optional[int] = None):
        super().__init__()
        w = width or 16 * self.widen
        stem = nn.Conv2d(in_shape[0], STEM, 3, padding=1, bias=False)
        self.stages = residual_stages(stem, STEM, (w, 2 * w, 4 * w), (self.depth - 4) // 6, PreActBlock)
        self.head = bn_relu(4 * w)
        self.fc = nn.Linear(4 * w, num_classes)
        self.init_weights()


@register_model("wrn_16_1")
class WRN16x1(WideResNet):
    depth, widen = 16, 1


@register_model("wrn_16_2")
class WRN16x2(WideResNet):
    depth, widen = 16, 2


@register_model("wrn_40_1")
class WRN40x1(WideResNet):
    depth, widen = 40, 1


@register_model("wrn_40_2")
class WRN40x2(WideResNet):
    depth, widen = 40, 2
