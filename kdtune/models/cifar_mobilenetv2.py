"""`mobilenetv2`: the CIFAR MobileNetV2 of the CRD benchmark (its "MobileNetV2", width multiplier 0.5).

Sandler et al.'s inverted residuals (1x1 expand by 6, depthwise 3x3, linear 1x1 projection;
a residual sum where the shape allows) after a stride-2 3x3 stem, with the ImageNet net's block
settings and a 1x1 conv to 1280 channels before pooling. On 32x32 inputs the blocks run at 16,
8, 4 and 2 pixels; the maps are the outputs at each resolution. As in the benchmark's net, the
first block (expansion 1) keeps its 1x1 expansion conv.

`width` is the stem's channels, 32 x the width multiplier: every block's channels scale by
width / 32 (rounded down), and the last conv's 1280 grows only above 32. Unset, it is 16, the
published multiplier 0.5 (812,836 parameters on CIFAR-100).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdtune.models.base import CifarNet, conv_bn, register_model

EXPANSION = 6
# (expansion, channels at width 32, blocks, stride of the first), grouped by output resolution
STAGES = (((1, 16, 1, 1), (EXPANSION, 24, 2, 1)),
          ((EXPANSION, 32, 3, 2),),
          ((EXPANSION, 64, 4, 2), (EXPANSION, 96, 3, 1)),
          ((EXPANSION, 160, 3, 2), (EXPANSION, 320, 1, 1)))
LAST_CHANNELS = 1280


class InvertedResidual(nn.Module):
    """conv1x1-BN-ReLU (expand), depthwise conv3x3-BN-ReLU, conv1x1-BN (project), plus the input
    when stride and channels allow."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        self.body = nn.Sequential(conv_bn(c_in, hidden, kernel_size=1),
                                  conv_bn(hidden, hidden, stride=stride, groups=hidden),
                                  conv_bn(hidden, c_out, kernel_size=1, relu=False))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


@register_model("mobilenetv2")
class CifarMobileNetV2(CifarNet):
    """Stem conv3x3/2 (w) | inverted residuals at 16, 8, 4, 2 px | conv1x1 (1280) | GAP | Linear."""

    def __init__(self, in_shape, num_classes, width: Optional[int] = None):
        super().__init__()
        w = width or 16
        c_in = w
        stages = [[conv_bn(in_shape[0], w, stride=2)], [], [], []]
        for stage, settings in enumerate(STAGES):
            for expansion, channels, blocks, stride in settings:
                c_out = max(channels * w // 32, 1)
                for i in range(blocks):
                    stages[stage].append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expansion))
                    c_in = c_out
        self.stages = nn.ModuleList(nn.Sequential(*layers) for layers in stages)
        last = max(LAST_CHANNELS, LAST_CHANNELS * w // 32)
        self.head = conv_bn(c_in, last, kernel_size=1)
        self.fc = nn.Linear(last, num_classes)
        self.init_weights()
