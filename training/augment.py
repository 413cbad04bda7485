"""--augment shift: training faces moved and rescaled a little, tokenized on the fly.

A token is the code of one 4x4 patch, so a face moved by 1-3 pixels is cut into another token grid: new token
sequences of the same face, which the transformer cannot learn by heart the way it learns the two fixed grids
(plain and flipped) of the token cache. Each sample is moved by a whole number of pixels in -MAX_SHIFT..MAX_SHIFT
on each axis (exact pixels: no resampling), and with probability ZOOM_PROB also zoomed in by up to MAX_ZOOM
(bilinear); pixels drawn from beyond the border are mirrored in. The frozen VQGAN then encodes the batch in the
token cache's precision. Every draw uses torch's RNG, which the training state saves, so --resume stays exact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("flip", "shift")  # --augment: the token cache's flips only, or flips + jitter (this module)
DEFAULT_AUGMENT = "flip"
MAX_SHIFT = 3  # pixels: below the 4-pixel patch, so every shift gives another token grid
MAX_ZOOM = 1.1  # the largest scale factor (the face grows by up to 6 pixels on a 64-pixel side)
ZOOM_PROB = 0.5  # the share of samples that are also rescaled (the rest keep their exact pixels)


def jitter(images: torch.Tensor) -> torch.Tensor:
    """Images [B, C, H, W] (any affine normalization: the resampling is a convex combination of pixels), each
    shifted and maybe zoomed as the module docstring says."""
    b, _, h, w = images.shape
    device = images.device
    shift = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (b, 2), device=device).float()
    zoom = torch.where(torch.rand(b, device=device) < ZOOM_PROB,
                       1 + (MAX_ZOOM - 1) * torch.rand(b, device=device), torch.ones(b, device=device))
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
    # affine_grid's coordinates span 2 per side: a shift of s pixels is 2 s / side
    theta[:, 0, 2], theta[:, 1, 2] = 2 * shift[:, 0] / w, 2 * shift[:, 1] / h
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
