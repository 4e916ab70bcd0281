"""Random crop with zero padding and horizontal flip, on whole batches on the trial's device.

A view is one (row shift, column shift, flip) of an image: with padding p and flips there
are (2p+1)^2 * 2 of them, each with an integer id, so the view a student saw can be named
(and a teacher output for exactly that view looked up). Padding is the normalised value of
a black pixel, as when the raw image is padded before normalisation.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


class Augment:
    def __init__(self, crop: int, flip: bool, pad_value: Optional[Sequence[float]] = None):
        self.crop, self.flip = crop, flip
        self.pad_value = pad_value
        self.side = 2 * crop + 1

    @classmethod
    def of(cls, spec_augment, splits) -> "Augment | None":
        """The spec's augmentation for these splits (pads at their black pixel), or None if it is off."""
        if not (spec_augment.crop or spec_augment.flip):
            return None
        black = None if splits.mean is None else [-m / s for m, s in zip(splits.mean, splits.std)]
        return cls(spec_augment.crop, spec_augment.flip, black)

    @property
    def num_views(self) -> int:
        return self.side ** 2 * (2 if self.flip else 1)

    def draw(self, n: int, generator: torch.Generator, device="cpu") -> torch.Tensor:
        """One view id per image, from the trial's seeded generator."""
        return torch.randint(0, self.num_views, (n,), generator=generator).to(device)

    def apply(self, x: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """Each image of `x` (N x C x H x W) under its own view, by one gather (no per-image loop)."""
        n, c, h, w = x.shape
        p = self.crop
        flips = views % 2 if self.flip else torch.zeros_like(views)
        shifts = views // 2 if self.flip else views
        dy, dx = shifts // self.side, shifts % self.side
        padded = x.new_zeros(n, c, h + 2 * p, w + 2 * p)
        if self.pad_value is not None:
            padded += torch.tensor(self.pad_value, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
        padded[:, :, p:p + h, p:p + w] = x
        cols = torch.arange(w, device=x.device)
        cols = torch.where(flips[:, None].bool(), w - 1 - cols, cols)  # a flip reads the crop right to left
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + cols)[:, None, None, :]
        return padded[torch.arange(n, device=x.device)[:, None, None, None],
                      torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
