"""CIFAR VGGs with batch norm of the CRD benchmark: `vgg8` and `vgg13`.

Five blocks of 3x3 conv-BN-ReLU (convs with bias, as published) at (w, 2w, 4w, 8w, 8w) channels,
max-pooled 2x2 before the second, third and fourth block: on 32x32 inputs the blocks run at 32,
16, 8, 4 and 4 pixels, and the last is average-pooled into one Linear (no fully connected
stack). Each block's output is a map. `vgg8` has one conv per block, `vgg13` two.

`width` is the base width w, the first block's channels (published: 64; 3,965,028 parameters
for vgg8 and 9,462,180 for vgg13 on CIFAR-100).
"""
from __future__ import annotations

from typing import ClassVar, Optional

from torch import nn

from kdtune.models.base import CifarNet, conv_bn, register_model

POOLED_BEFORE = (1, 2, 3)  # the blocks a 2x2 max-pool precedes


class CifarVGG(CifarNet):
    """Blocks of `convs_per_block` conv3x3-BN-ReLU at (w, 2w, 4w, 8w, 8w) | GAP | Linear(8w, classes)."""

    convs_per_block: ClassVar[int]

    def __init__(self, in_shape, num_classes, width: Optional[int] = None):
        super().__init__()
        w = width or 64
        stages, c_in = [], in_shape[0]
        for block, c_out in enumerate((w, 2 * w, 4 * w, 8 * w, 8 * w)):
            layers = [nn.MaxPool2d(2)] if block in POOLED_BEFORE else []
            for _ in range(self.convs_per_block):
                layers.append(conv_bn(c_in, c_out, bias=True))
                c_in = c_out
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(c_in, num_classes)
        self.init_weights()


@register_model("vgg8")
class VGG8(CifarVGG):
    convs_per_block = 1


@register_model("vgg13")
class VGG13(CifarVGG):
    convs_per_block = 2
