"""A user's own teacher, student family and datasets, as kdtune takes them by import path.

Nothing here imports kdtune's models: the teacher and the student return plain logits, the
datasets are torchvision datasets of (image tensor, int label). The spec names what kdtune
needs to read inside them (`features`), and kdtune finds the rest.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision import datasets, transforms

MEAN, STD = (0.1307,), (0.3081,)


def teacher(num_classes: int = 10, channels: int = 32) -> nn.Module:
    """A plain conv net: two conv blocks, then a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.BatchNorm2d(2 * channels), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * channels * 7 * 7, 128), nn.ReLU(), nn.Linear(128, num_classes))


class TinyNet(nn.Module):
    """The student family: three conv-BN-ReLU stages of `width`, 2`width`, 4`width` channels,
    global average pool, linear."""

    def __init__(self, num_classes: int = 10, width: int = 8, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def dataset(root: str = "data", limit: int = 6000) -> tuple[datasets.MNIST, datasets.MNIST]:
    """(train, test): MNIST as a user would load it, `limit` training images (kdtune's own
    `mnist` loader fills `root/MNIST/raw` from the copy bundled with kdtune)."""
    from kdtune.data.mnist import unpack_bundled

    unpack_bundled(root)
    normalise = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    train = datasets.MNIST(root, train=True, transform=normalise)
    test = datasets.MNIST(root, train=False, transform=normalise)
    return torch.utils.data.Subset(train, range(limit)), torch.utils.data.Subset(test, range(limit // 6))


def rgb32(root: str = "data", limit: int = 3000) -> tuple[datasets.MNIST, datasets.MNIST]:
    """(train, test): MNIST digits padded to 32x32 and repeated over 3 channels, the input
    torchvision's ImageNet families expect (for the torchvision example)."""
    from kdtune.data.mnist import unpack_bundled

    unpack_bundled(root)
    to_rgb = transforms.Compose([transforms.Pad(2), transforms.Grayscale(3), transforms.ToTensor(),
                                 transforms.Normalize(MEAN * 3, STD * 3)])
    train = datasets.MNIST(root, train=True, transform=to_rgb)
    test = datasets.MNIST(root, train=False, transform=to_rgb)
    return torch.utils.data.Subset(train, range(limit)), torch.utils.data.Subset(test, range(limit // 6))
