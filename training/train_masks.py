"""Inpainting-aware training masks (training_transformer.py --train-masks) and the fixed val hole masks.

MaskGIT's MVTM rule masks random tokens anywhere, but every hole the sampler fills is a coherent region. A hole
sample takes a stroke or box hole (utils.masks), its unknown tokens H by the lab's latent rule (sampler.latent_mask)
and masks max(1, ceil(gamma(r) * |H|)) random tokens of H (MaskGit.mask_tokens inside a region): gamma(r) near 1
is the whole hole, as at decoding step 0; smaller values leave part of it known, as at later steps. The hole
rule lives here, not beside mask_tokens, because models/ may not import the sampler's latent rule; models/ keeps
the one MVTM rule, which here only gets a region.

stroke_mask takes 10-20 ms a hole, far too slow per sample, so the holes are drawn once into a bank from --seed;
each sample then picks an entry and one of its 8 flips/transposes with torch's RNG, which the training state
saves, so --resume continues exactly. The bank keeps the pixel holes, not only their tokens: a transformer with
pixel conditioning sees the known pixels of partly covered tokens, as it does at test time. A uniform (MVTM)
sample has no pixel hole; its masked tokens hide their whole patches (pixel_known_of_tokens).
"""
from __future__ import annotations

import numpy as np
import torch

from models.VQGAN_Transformer import MaskGit
from sampler.latent_mask import latent_known_mask, pixel_known_of_tokens
from utils.image import IMAGE_SIZE
from utils.masks import HOLE_KINDS, fixed_holes

# --train-masks: the hole kinds each choice draws from (uniform: none, MVTM everywhere; mix: stroke or box 50/50)
TRAIN_MASKS = {"uniform": (), "strokes": ("stroke",), "boxes": ("box",), "mix": ("stroke", "box")}
DEFAULT_TRAIN_MASKS = "uniform"
DEFAULT_HOLE_MASK_PROB = 0.5  # --hole-mask-prob: with mix, the share of samples that take a hole
# bank entries per kind (times 8 flips/transposes): 256 strokes take about 3 s on one CPU core, 2048 boxes 0.3 s
BANK_SIZE = {"stroke": 256, "box": 2048}
HOLE_BANK_SEED = 20240  # with --seed, the entropy of the training holes: none of them is a val or test hole


def latent_holes(pixel_holes: np.ndarray | torch.Tensor, latent_resolution: int) -> torch.Tensor:
    """Pixel holes bool [M, H, W] (True = hole) -> their unknown tokens bool [M, latent_resolution**2]: every token
    with a hole pixel."""
    return ~latent_known_mask(~torch.as_tensor(pixel_holes), latent_resolution)


def hole_bank(kind: str, seed: int) -> torch.Tensor:
    """BANK_SIZE[kind] pixel holes of one kind of utils.masks.HOLE_KINDS, fixed by `seed`: bool [M, H, W]."""
    entropy = [HOLE_BANK_SEED, list(HOLE_KINDS).index(kind), seed % 2 ** 32]
    rng = np.random.default_rng(entropy)
    return torch.from_numpy(np.stack([HOLE_KINDS[kind](rng) for _ in range(BANK_SIZE[kind])]))


def val_holes(n: int) -> np.ndarray:
    """The fixed pixel holes of the first `n` val images, bool [n, H, W]: the first half take their stroke hole,
    the rest their box hole of utils.masks.fixed_holes (the holes experiments.py --split val fills)."""
    strokes = (n + 1) // 2
    return np.concatenate([fixed_holes("stroke", strokes), fixed_holes("box", n)[strokes:]])


class TrainingMasks:
    """The masks of one training batch by the --train-masks rule: uniform (MaskGIT's MVTM), strokes or boxes
    (every sample inside a hole of that kind) or mix (each sample inside a hole with probability `hole_prob`,
    stroke or box 50/50, else uniform). A sample whose hole covers no token falls back to the uniform rule."""

    def __init__(self, maskgit: MaskGit, mode: str, hole_prob: float, seed: int, device: torch.device) -> None:
        self.maskgit, self.mode, self.hole_prob = maskgit, mode, hole_prob
        kinds = TRAIN_MASKS[mode]
        banks = [hole_bank(kind, seed) for kind in kinds]
        self.bank = torch.cat(banks).to(device) if banks else None  # the kinds one after the other
        sizes = torch.tensor([len(b) for b in banks], dtype=torch.long)
        self.sizes = sizes.to(device)
        self.offsets = (sizes.cumsum(0) - sizes).to(device)

    def holes(self, b: int, device: torch.device) -> torch.Tensor:
        """`b` pixel holes bool [b, H, W]: a kind, an entry of its bank and a flip/transpose, each drawn per sample."""
        kind = torch.randint(len(self.sizes), (b,), device=device)
        entry = self.offsets[kind] + (torch.rand(b, device=device) * self.sizes[kind]).long()
        holes = self.bank[entry]
        flip = torch.rand(b, 3, device=device)[:, :, None, None] < 0.5
        holes = torch.where(flip[:, 0], holes.flip(-1), holes)
        holes = torch.where(flip[:, 1], holes.flip(-2), holes)
        return torch.where(flip[:, 2], holes.transpose(-1, -2), holes)

    def __call__(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids [B, N] -> (corrupted ids, mask bool [B, N], pixel_known bool [B, 1, H, W]); uniform draws
        exactly MaskGit.mask_tokens, and its pixel_known is the patches of the tokens it leaves."""
        corrupted, mask = self.maskgit.mask_tokens(target)
        pixel_known = pixel_known_of_tokens(~mask, IMAGE_SIZE)
        if self.bank is None:
            return corrupted, mask, pixel_known
        b, device = len(target), target.device
        use = torch.rand(b, device=device) < self.hole_prob if self.mode == "mix" else \
            torch.ones(b, dtype=torch.bool, device=device)
        pixel_holes = self.holes(b, device)
        holes = latent_holes(pixel_holes, self.maskgit.latent_resolution)
        use &= holes.any(dim=1)
        hole_mask = self.maskgit.mask_tokens(target, region=holes)[1]
        mask = torch.where(use[:, None], hole_mask, mask)
        pixel_known = torch.where(use[:, None, None, None], ~pixel_holes[:, None], pixel_known)
        return target.masked_fill(mask, self.maskgit.mask_token_id), mask, pixel_known
