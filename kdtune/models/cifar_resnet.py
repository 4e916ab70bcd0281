"""CIFAR ResNets of the CRD benchmark: `resnet8` ... `resnet110`, `resnet8x4`, `resnet32x4`.

He et al.'s CIFAR design: a 3x3 stem conv, then three stages of (depth - 2) / 6 basic blocks at
32x32, 16x16 and 8x8, the second and third opening with a stride-2 block; each stage's output
is a map. A block whose input and output shapes differ projects its shortcut with a 1x1 conv-BN.

`width` is the base width: the first stage's channels w, the stages having (w, 2w, 4w). The plain
nets' stem has w channels (published: w = 16; resnet20 has 278,324 parameters on CIFAR-100); the
x4 nets' stem has w / 2 (published: w = 64 with a 32-channel stem: 1,233,540 for resnet8x4,
7,433,860 for resnet32x4), so a width search scales the whole net as published.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdtune.models.base import CifarNet, conv_bn, register_model, residual_stages


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU, conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c_in, c_out, stride=stride), conv_bn(c_out, c_out, relu=False))
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out
                         else conv_bn(c_in, c_out, kernel_size=1, stride=stride, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class CifarResNet(CifarNet):
    """Stem conv3x3 (w / stem_divisor) | n blocks (w) | n blocks, stride 2 (2w) | the same (4w) | GAP | Linear."""

    depth: ClassVar[int]
    default_width: ClassVar[int] = 16
    stem_divisor: ClassVar[int] = 1

    def __init__(self, in_shape, num_classes, width: Optional[int] = None):
        super().__init__()
        w = width or self.default_width
        stem = max(w // self.stem_divisor, 1)
        self.stages = residual_stages(conv_bn(in_shape[0], stem), stem, (w, 2 * w, 4 * w), (self.depth - 2) // 6,
                                      BasicBlock)
        self.fc = nn.Linear(4 * w, num_classes)
        self.init_weights()


@register_model("resnet8")
class ResNet8(CifarResNet):
    depth = 8


@register_model("resnet14")
class ResNet14(CifarResNet):
    depth = 14


@register_model("resnet20")
class ResNet20(CifarResNet):
    depth = 20


@register_model("resnet32")
class ResNet32(CifarResNet):
    depth = 32


@register_model("resnet44")
class ResNet44(CifarResNet):
    depth = 44


@register_model("resnet56")
class ResNet56(CifarResNet):
    depth = 56


@register_model("resnet110")
class ResNet110(CifarResNet):
    depth = 110


@register_model("resnet8x4")
class ResNet8x4(CifarResNet):
    depth, default_width, stem_divisor = 8, 64, 2


@register_model("resnet32x4")
class ResNet32x4(CifarResNet):
    depth, default_width, stem_divisor = 32, 64, 2
