"""Augmentation and normalisation on the device, one batch at a time.

The loader hands over uint8 pairs (B, 2, S, S, 3) straight from the prepared image cache; everything else
(flips, rotation/zoom, colour jitter, normalisation, channels_last) runs here as a few batched tensor ops, so
the CPU never becomes the bottleneck and no JPEG is decoded during training. Random parameters come from a
seeded CPU generator, which keeps runs reproducible and resumable at epoch boundaries.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .settings import key, reads

AUGMENT_KEYS = {
    "aug_flip": key(True, "random horizontal and vertical flips", results=True),
    "aug_rotate": key(30.0, "max rotation in degrees", results=True, low=0, high=180),
    "aug_scale": key(0.0, "max relative zoom in/out (0 = none)", results=True, low=0, high=1, high_open=True),
    "aug_color": key(0.2, "colour jitter strength (brightness, contrast, saturation)", results=True, low=0, high=1),
}


@reads(AUGMENT_KEYS)
def device_augment(cfg, mean, std, channels_last: bool) -> "DeviceAugment":
    """The augmentation part: the training augmentation and the TTA views of a network normalised with
    (``mean``, ``std``)."""
    return DeviceAugment(mean, std, flip=cfg.aug_flip, rotate=cfg.aug_rotate, scale=cfg.aug_scale,
                         color=cfg.aug_color, channels_last=channels_last)


class DeviceAugment:
    def __init__(self, mean, std, *, flip: bool = True, rotate: float = 0.0, scale: float = 0.0,
                 color: float = 0.0, channels_last: bool = False):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.flip, self.rotate, self.scale, self.color = flip, rotate, scale, color
        self.channels_last = channels_last

    def to_float(self, pairs: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 2, S, S, 3) -> float (B*2, 3, S, S) in [0, 1]; rows are clin0, derm0, clin1, derm1, ..."""
        b, two, s1, s2, c = pairs.shape
        return pairs.reshape(b * two, s1, s2, c).permute(0, 3, 1, 2).float().div_(255.0)

    def normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x[0::2], x[1::2]

    def eval(self, pairs: torch.Tensor, view: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministic preprocessing; ``view`` in 0..7 picks one of the 8 flip/transpose TTA views."""
        return self.normalise(tta_view(self.to_float(pairs), view))

    def train(self, pairs: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Independent random augmentation of every image of every pair."""
        x = self.to_float(pairs)
        n, dev = x.shape[0], x.device
        # every random number of the batch in one host-to-device copy: from pinned memory and non-blocking, so
        # the host never waits for the GPU here and can queue the next kernels while the current ones run
        r = torch.rand(n, 7, generator=gen)
        r = r.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else r
        r4 = r.view(n, 7, 1, 1)

        if self.flip:
            x = torch.where(r4[:, 0:1] < 0.5, x.flip(-1), x)
            x = torch.where(r4[:, 1:2] < 0.5, x.flip(-2), x)
        if self.rotate > 0 or self.scale > 0:
            angle = (r[:, 2] * 2 - 1) * math.radians(self.rotate)
            zoom = 1.0 + (r[:, 3] * 2 - 1) * self.scale
            cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
            zero = torch.zeros_like(cos)
            theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if self.color > 0:
            s = self.color
            bright, contrast, sat = (1 + (r4[:, i:i + 1] * 2 - 1) * s for i in (4, 5, 6))
            x = x * bright
            gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
            x = (x - gray.mean((2, 3), keepdim=True)) * contrast + gray.mean((2, 3), keepdim=True)
            gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
            x = (x - gray) * sat + gray
            x = x.clamp_(0.0, 1.0)
        return self.normalise(x)


def tta_view(x: torch.Tensor, view: int) -> torch.Tensor:
    """The 8 symmetries of the square: bit 0 = horizontal flip, bit 1 = vertical flip, bit 2 = transpose."""
    if view & 1:
        x = x.flip(-1)
    if view & 2:
        x = x.flip(-2)
    if view & 4:
        x = x.transpose(-1, -2)
    return x
