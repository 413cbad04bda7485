"""Image conventions shared by every script: the lab's normalization and PNG I/O.

The lab normalizes train/val images and test images with slightly different statistics;
keeping both here is the single home for those constants.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from utils.checkpoint import atomic_write

IMAGE_SIZE = 64
HOLE_GRAY = 128  # value painted into every channel of a missing pixel

TRAIN_MEAN = (0.4816, 0.4324, 0.3845)
TRAIN_STD = (0.2602, 0.2518, 0.2537)
TEST_MEAN = (0.4868, 0.4341, 0.3844)
TEST_STD = (0.2620, 0.2527, 0.2543)

_STATS = {"train": (TRAIN_MEAN, TRAIN_STD), "val": (TRAIN_MEAN, TRAIN_STD), "test": (TEST_MEAN, TEST_STD)}


def _stats(split: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if split not in _STATS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(_STATS)}")
    mean, std = _STATS[split]
    shape = (1, 3, 1, 1) if like.dim() == 4 else (3, 1, 1)
    return (torch.tensor(mean, dtype=like.dtype, device=like.device).view(shape),
            torch.tensor(std, dtype=like.dtype, device=like.device).view(shape))


def normalize(x: torch.Tensor, split: str = "train") -> torch.Tensor:
    """[0,1] images (C,H,W or B,C,H,W) -> the lab's normalized space."""
    mean, std = _stats(split, x)
    return (x - mean) / std


def denormalize(x: torch.Tensor, split: str = "train") -> torch.Tensor:
    """Normalized images -> [0,1], clamped."""
    mean, std = _stats(split, x)
    return (x * std + mean).clamp(0.0, 1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[0,1] tensor (C,H,W or B,C,H,W) -> uint8 array in H,W,C (or B,H,W,C) order."""
    x = x.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return (x.permute(0, 2, 3, 1) if x.dim() == 4 else x.permute(1, 2, 0)).numpy()


def uint8_to_tensor(a: np.ndarray) -> torch.Tensor:
    """uint8 H,W,C (or B,H,W,C) -> float [0,1] C,H,W (or B,C,H,W)."""
    t = torch.from_numpy(np.ascontiguousarray(a)).float().div(255)
    return t.permute(0, 3, 1, 2) if t.dim() == 4 else t.permute(2, 0, 1)


def diffuse_fill(values: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Fill the unknown pixels of `values` [B,C,H,W] (float; `known` bool [B,1,H,W]) from the outside in: each
    round, every unknown pixel touching a filled one takes the mean of its filled 3x3 neighbours.

    A smooth, content-free continuation used twice by the sampler: as the VQGAN encoder's input in the holes (it
    never saw gray strokes in training) and to spread the seam residual (sampler.maskgit_sampler.tokens_to_uint8).
    Known pixels are returned unchanged; an image with no known pixel stays 0.
    """
    weight = known.to(values.dtype).expand(-1, 1, -1, -1)
    filled = values * weight
    channels, kernel = values.shape[1], values.new_ones(1, 1, 3, 3)
    while True:
        frontier_sum = F.conv2d(filled.flatten(0, 1)[:, None], kernel, padding=1).view_as(filled)
        count = F.conv2d(weight, kernel, padding=1)
        new = (count > 0) & (weight == 0)
        if not new.any():
            return filled
        filled = torch.where(new.expand(-1, channels, -1, -1), frontier_sum / count.clamp(min=1), filled)
        weight = weight + new.to(weight.dtype)


def read_rgb(path: str | Path, size: int | None = IMAGE_SIZE, gray_ok: bool = True) -> np.ndarray:
    """Read an RGB image as uint8 H,W,3; raises ValueError naming the file when it is unusable.

    RGBA loses its alpha, palette images are expanded; grayscale is copied to 3 channels unless `gray_ok` is False
    (where a grayscale file means a mask given in place of an image)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "L" and not gray_ok:
                raise ValueError(f"{path}: image is grayscale, expected RGB; is this a mask? (image and mask "
                                 "folders swapped?)")
            if im.mode not in ("RGB", "RGBA", "L", "P"):
                raise ValueError(f"{path}: image mode {im.mode} is not RGB; convert it to RGB first")
            arr = np.array(im.convert("RGB"))
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot read image ({e}); replace or remove the file") from e
    if size is not None and arr.shape[:2] != (size, size):
        raise ValueError(f"{path}: image is {arr.shape[1]}x{arr.shape[0]}, expected {size}x{size}; resize it first")
    return arr


def save_png(arr: np.ndarray, path: str | Path) -> None:
    """Save a uint8 H,W,C or H,W array as PNG, atomically: a full disk or a kill never leaves a truncated PNG
    that a later step (FID, training) would take for a real image."""
    image = Image.fromarray(arr)
    atomic_write(path, lambda f: image.save(f, format="PNG"), durable=False)
