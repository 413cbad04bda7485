"""The lab's latent-mask rule: a token is known only if every pixel of its patch is known; and the way back, a
masked token hiding its whole patch."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def latent_known_mask(pixel_known: torch.Tensor, latent_resolution: int = 16) -> torch.Tensor:
    """pixel_known: bool [B,1,H,W] or [B,H,W] (True = known pixel) -> bool [B, latent_resolution**2].

    Min-pooling over each patch implements "all pixels known"; the flattening is row-major (h, w),
    the same order as the VQGAN's token indices.
    """
    if pixel_known.dim() == 3:
        pixel_known = pixel_known.unsqueeze(1)
    size = pixel_known.shape[-1]
    if size % latent_resolution:
        raise ValueError(f"mask size {size} is not a multiple of the latent resolution {latent_resolution}")
    patch = size // latent_resolution
    known = -F.max_pool2d(-pixel_known.float(), kernel_size=patch, stride=patch)
    return known.flatten(1) > 0.5


def pixel_known_of_tokens(token_known: torch.Tensor, image_size: int) -> torch.Tensor:
    """bool [B, N] (True = known token) -> bool [B, 1, image_size, image_size]: every pixel of a known token's patch
    known, every pixel of a masked token's patch not (the pixels a token mask leaves when no pixel hole is drawn)."""
    side = math.isqrt(token_known.shape[1])
    patch = image_size // side
    grid = token_known.view(-1, 1, side, side)
    return grid.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)
