"""The MNIST family: the PyTorch example's teacher and the small MLP and CNN students."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdtune.models.base import Features, register_model


class MnistNet(nn.Module):
    """The setting these nets were designed for, which `python -m kdtune.models` builds."""

    default_in_shape = (1, 28, 28)
    default_num_classes = 10


@register_model("mnist_cnn")
class TeacherCNN(MnistNet):
    """The PyTorch MNIST example's net: conv32-conv64-maxpool-fc128-fc10 (1.2M params on MNIST)."""

    has_maps = True

    def __init__(self, in_shape, num_classes, width=None):
        super().__init__()
        c, h, w = in_shape
        self.conv1 = nn.Conv2d(c, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(64 * ((h - 4) // 2) * ((w - 4) // 2), 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> Features:
        m1 = F.relu(self.conv1(x))
        m2 = F.relu(self.conv2(m1))
        h = self.dropout1(torch.flatten(F.max_pool2d(m2, 2), 1))
        embedding = F.relu(self.fc1(h))
        return Features(self.fc2(self.dropout2(embedding)), embedding, [m1, m2])


@register_model("mlp")
class StudentMLP(MnistNet):
    """Hidden layers [width, width/2]; width 128 gives the tutorial's 109k-param student."""

    has_maps = False

    def __init__(self, in_shape, num_classes, width=128):
        super().__init__()
        c, h, w = in_shape
        self.fc1 = nn.Linear(c * h * w, width)
        self.fc2 = nn.Linear(width, max(width // 2, 1))
        self.fc3 = nn.Linear(max(width // 2, 1), num_classes)

    def forward(self, x: torch.Tensor) -> Features:
        embedding = F.relu(self.fc2(F.relu(self.fc1(torch.flatten(x, 1)))))
        return Features(self.fc3(embedding), embedding)


def _after_convs(side: int) -> int:
    """A side after conv3 stride 2, conv3, maxpool 2 (no padding)."""
    return ((side - 3) // 2 + 1 - 2) // 2


@register_model("cnn")
class StudentCNN(MnistNet):
    """conv(width, stride 2)-BN-conv(2*width)-BN-maxpool-linear: width 6 has 3.8k params.

    The strided first conv puts the second one on 13x13 and skips a pooling pass over
    the largest map, so a CPU step costs a third of conv-conv-maxpool at full size;
    batch norm buys small widths about 0.3 points at a high lr for 20% more time.
    """

    has_maps = True

    def __init__(self, in_shape, num_classes, width=8):
        super().__init__()
        c, h, w = in_shape
        self.conv1, self.bn1 = nn.Conv2d(c, width, 3, stride=2), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, 2 * width, 3), nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width * _after_convs(h) * _after_convs(w), num_classes)

    def forward(self, x: torch.Tensor) -> Features:
        m1 = F.relu(self.bn1(self.conv1(x)))
        m2 = F.relu(self.bn2(self.conv2(m1)))
        embedding = torch.flatten(F.max_pool2d(m2, 2), 1)
        return Features(self.fc(embedding), embedding, [m1, m2])
