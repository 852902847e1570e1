"""Batched image preprocessing and augmentation on the training device (no per-image Python work)."""

from __future__ import annotations

import torch
from torch import Tensor


def normalize(images_BCHW: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 (or float in [0, 255]) images to float32, standardised per channel."""
    x = images_BCHW.float().div_(255.0)
    return (x - mean.view(1, -1, 1, 1).to(x.device)) / std.view(1, -1, 1, 1).to(x.device)


def random_crop(x_BCHW: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad by ``padding`` and take a random crop of the original size, an independent offset per image."""
    if padding <= 0:
        return x_BCHW
    b, c, h, w = x_BCHW.shape
    padded = torch.nn.functional.pad(x_BCHW, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=generator.device).to(x_BCHW.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=generator.device).to(x_BCHW.device)
    rows = (dy[:, None] + torch.arange(h, device=x_BCHW.device))[:, None, :, None].expand(b, c, h, w)
    cols = (dx[:, None] + torch.arange(w, device=x_BCHW.device))[:, None, None, :].expand(b, c, h, w)
    tall = padded.gather(2, rows.new_zeros(b, c, h, w + 2 * padding) + rows[..., :1])
    return tall.gather(3, cols)


def random_hflip(x_BCHW: Tensor, generator: torch.Generator) -> Tensor:
    flip = torch.rand(x_BCHW.shape[0], generator=generator, device=generator.device).to(x_BCHW.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x_BCHW.flip(-1), x_BCHW)


def train_transform(images_BCHW: Tensor, mean: Tensor, std: Tensor, *, crop_padding: int, hflip: bool,
                    generator: torch.Generator | None) -> Tensor:
    """Normalise, then the random crop and flip drawn from ``generator`` (needed only for those)."""
    x = normalize(images_BCHW, mean, std)
    x = random_crop(x, crop_padding, generator)
    if hflip:
        x = random_hflip(x, generator)
    return x
