"""--augment shift: training faces moved and rescaled a little, as token grids cached once per token cache.

A token is the code of one 4x4 patch, so a face moved by 1-3 pixels is cut into another token grid: new token
sequences of the same face, which the transformer cannot learn by heart the way it learns the two fixed grids
(plain and flipped) of the token cache. Each jitter moves a face by a whole number of pixels in -MAX_SHIFT..MAX_SHIFT
on each axis (exact pixels: no resampling), and with probability ZOOM_PROB also zooms in by up to MAX_ZOOM
(bilinear); pixels drawn from beyond the border are mirrored in.

Tokenizing the jittered batch at every step cost 0.12 s of a 0.57 s step (docs/RESULTS.md), so the frozen VQGAN
encodes SHIFT_VARIANTS jitters of every training sequence once, in the token cache's precision, into a cache of
their own beside it (shifted_tokens.pt). A step then takes each sequence in one of its variants, drawn with
torch's RNG (which the training state saves, so --resume stays exact), and rebuilds that variant's pixels from its
stored jitter for the pixel conditioning: a resampling of 32 small images, not an encoding.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.VQGAN import VQGAN
from training.token_cache import cache_is_current, encode_tokens
from utils.checkpoint import atomic_save
from utils.image import normalize

AUGMENTATIONS = ("flip", "shift")  # --augment: the token cache's flips only, or flips + jitter (this module)
DEFAULT_AUGMENT = "flip"
MAX_SHIFT = 3  # pixels: below the 4-pixel patch, so every shift gives another token grid
MAX_ZOOM = 1.1  # the largest scale factor (the face grows by up to 6 pixels on a 64-pixel side)
ZOOM_PROB = 0.5  # the share of samples that are also rescaled (the rest keep their exact pixels)
# jitters cached per training sequence: with the flips, 2 x SHIFT_VARIANTS grids of every face instead of 2; each
# variant costs one more tokenizing of the training set (78 s in fp32 on the Xeon without bf16 units)
SHIFT_VARIANTS = 4
SHIFT_CACHE_FORMAT = "maskgit-shifted-tokens-v1"
SHIFT_SEED = 0  # the variants' jitters are a fixed draw: the same cache on every machine


def draw_jitters(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n jitters [n, 3]: the shift in pixels along x and y, and the zoom factor."""
    shift = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (n, 2), generator=generator).float()
    zoomed = torch.rand(n, generator=generator) < ZOOM_PROB
    zoom = torch.where(zoomed, 1 + (MAX_ZOOM - 1) * torch.rand(n, generator=generator), torch.ones(n))
    return torch.cat([shift, zoom[:, None]], dim=1)


def jitter(images: torch.Tensor, jitters: torch.Tensor) -> torch.Tensor:
    """Images [B, C, H, W] (any affine normalization: the resampling is a convex combination of pixels), each
    moved and zoomed by its row of `jitters` [B, 3] (draw_jitters)."""
    b, _, h, w = images.shape
    jitters = jitters.to(images.device, torch.float32)
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / jitters[:, 2]
    # affine_grid's coordinates span 2 per side: a shift of s pixels is 2 s / side
    theta[:, 0, 2], theta[:, 1, 2] = 2 * jitters[:, 0] / w, 2 * jitters[:, 1] / h
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def shifted_cache_path(token_cache: str | Path) -> Path:
    return Path(token_cache).with_name("shifted_tokens.pt")


def _shift_key(token_cache_key: str) -> str:
    recipe = f"{SHIFT_CACHE_FORMAT} {token_cache_key} {SHIFT_VARIANTS} {SHIFT_SEED} {MAX_SHIFT} {MAX_ZOOM} {ZOOM_PROB}"
    return hashlib.sha256(recipe.encode()).hexdigest()


@torch.no_grad()
def ensure_shifted_tokens(vqgan: VQGAN, token_cache: str | Path, train_images: torch.Tensor, device: torch.device,
                          batch_size: int = 64, verbose: bool = True) -> Path:
    """The cache of SHIFT_VARIANTS jittered token grids of every training sequence (the token cache's train images
    `train_images` uint8 [n, 3, H, W], then their flips), built unless it is there for this token cache."""
    cache = torch.load(token_cache, map_location="cpu", weights_only=True)
    key, path = _shift_key(cache["key"]), shifted_cache_path(token_cache)
    if cache_is_current(path, key):
        return path
    amp = "bf16" if cache["encoder_precision"] == "bf16" else "none"
    sequences = torch.cat([train_images, train_images.flip(-1)])
    jitters = draw_jitters(SHIFT_VARIANTS * len(sequences), torch.Generator().manual_seed(SHIFT_SEED))
    jitters = jitters.view(SHIFT_VARIANTS, len(sequences), 3)
    vqgan = vqgan.to(device).eval()
    tokens = []
    batches = [(v, first) for v in range(SHIFT_VARIANTS) for first in range(0, len(sequences), batch_size)]
    for v, first in tqdm(batches, desc=f"tokenizing {SHIFT_VARIANTS} shifted variants", unit="batch",
                         disable=not verbose, dynamic_ncols=True):
        x = normalize(sequences[first:first + batch_size].float().div(255), "train").to(device)
        tokens.append(encode_tokens(vqgan, jitter(x, jitters[v, first:first + batch_size]), amp).cpu())
    tokens = torch.cat(tokens).to(cache["train"].dtype).view(SHIFT_VARIANTS, len(sequences), -1)
    atomic_save({"format": SHIFT_CACHE_FORMAT, "key": key, "tokens": tokens, "jitters": jitters}, path)
    if verbose:
        print(f"shifted tokens: {SHIFT_VARIANTS} variants of {len(sequences)} training sequences -> {path}")
    return path


def load_shifted_tokens(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached variants: tokens [V, 2n, N] and their jitters [V, 2n, 3] (sequence r >= n: image r - n flipped)."""
    cache = torch.load(path, map_location="cpu", weights_only=True)
    return cache["tokens"], cache["jitters"]
