"""Pictures of the iterative decoding: the latent mask and the decoded image after every step, as tile strips.

inpainting.py writes them as the lab's mask_scheduling/ and imga/ images; experiments.py stacks them into the
decoding figure.
"""
from __future__ import annotations

import numpy as np
import torch

from models.VQGAN_Transformer import MaskGit
from sampler.maskgit_sampler import InpaintOutput, tokens_to_uint8

TILE_PAD = 2  # gray border between the steps of a strip


def strip(tiles: np.ndarray) -> np.ndarray:
    """uint8 [S, H, W, 3] -> one row of tiles with gray borders."""
    padded = np.pad(tiles, ((0, 0), (TILE_PAD, TILE_PAD), (TILE_PAD, TILE_PAD), (0, 0)), constant_values=128)
    return np.concatenate(list(padded), axis=1)


def step_tiles(model: MaskGit, result: InpaintOutput, rows: list[int], known: torch.Tensor,
               paste_back: bool) -> tuple[np.ndarray, np.ndarray]:
    """For the batch rows `rows` of a keep_steps result: uint8 tiles [R, S, H, W, 3] of the latent mask after every
    step (white = known, upscaled to the image size) and of the image decoded at every step."""
    steps, size = len(result.decode.step_tokens), result.masked.shape[1]
    tokens = torch.stack(result.decode.step_tokens)[:, rows].flatten(0, 1)  # [S*R, N], step-major
    base = np.tile(result.masked[rows], (steps, 1, 1, 1)) if paste_back else None
    images = tokens_to_uint8(model, tokens, base, known[rows].repeat(steps, 1, 1, 1), result.split,
                             result.seam_blend)
    images = images.reshape(steps, len(rows), *images.shape[1:]).swapaxes(0, 1)
    res = model.latent_resolution
    masks = ~torch.stack(result.decode.step_masks)[:, rows].view(steps, len(rows), res, res).cpu().numpy()
    masks = np.kron(masks.swapaxes(0, 1), np.ones((1, 1, size // res, size // res), dtype=bool))
    return np.repeat(masks[..., None] * np.uint8(255), 3, axis=-1), images
