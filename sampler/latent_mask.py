"""The lab's latent-mask rule: a token is known only if every pixel of its patch is known."""
from __future__ import annotations

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
