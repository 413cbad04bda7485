"""MaskGIT iterative decoding for inpainting: batched, and kept apart from the networks.

Convention, per image b with m_b initially masked tokens, T = total_iter steps, t = 0..T-1:
  1. one transformer forward on the current tokens (still-masked positions hold the mask id);
  2. every still-masked token gets a candidate, sampled from softmax(logits[:K] / temperature_t) over the K real
     codes (never the mask id), or its argmax; temperature_t is `temperature` at every step, or with
     `final_temperature` it anneals linearly from `temperature` at t = 0 to `final_temperature` at t = T-1;
  3. confidence, by the `ordering`:
     - "confidence" (the lab's): log p(candidate) + choice_temperature * (1 - t/T) * Gumbel noise (the MaskGIT
       paper's rule, p being the distribution the candidate came from);
     - "halton" (valeoai's Halton-MaskGIT, Besnier et al., ICLR 2025): minus the position's place in
       `halton_order`, a fixed low-discrepancy order of the latent grid, so that the tokens fixed at each step
       spread evenly over the hole instead of clustering where the model is sure; the candidates' probabilities
       and the Gumbel noise play no part (candidates are drawn as above);
     known tokens and tokens fixed earlier get +inf;
  4. the n_t = ceil(gamma((t+1)/T) * m_b) least confident candidates stay masked, all others are fixed.
Because gamma is non-increasing with gamma(1) = 0: n_t never increases, n_{T-1} = 0 (the last step leaves
nothing masked), known tokens never change and a token fixed at step t stays fixed; both orderings share this
schedule, and differ only in which of the still-masked tokens step t fixes.
Sweet spot s (1..T): run steps 0..s-1 and take step s-1's tokens, i.e. the tokens still masked after it are
filled with that step's candidates (the lab's "take the image at step s"); s = T is the full decode.

Images in one batch may have different numbers of masked tokens: the re-masking ranks every row's confidences
and compares the ranks with a per-row n_t, so no step loops over images.

Two additions beyond the lab, both off by default (pixel_guidance=0, seam_blend=False gives the lab's decoding):
- pixel guidance: a token whose 4x4 patch is partly known is still masked (the lab's rule), but its known pixels
  say a lot about it. The VQGAN encoder reads the image with its holes diffusion-filled (utils.image.diffuse_fill)
  and each masked token's logits get  -pixel_guidance * known_fraction * ||z - e_k||^2 / median_nearest  added:
  a product of the transformer's distribution and a likelihood from the known pixels, weighted by how much of
  the patch is known (a patch that is all hole gets no pull). The known tokens come from the same reading.
- seam blend: the decoded image and the known pixels disagree slightly (the VQGAN is lossy), which leaves a
  visible seam around every stroke once the known pixels are pasted back. The residual known - decoded is
  diffusion-filled into the holes and added to the decoded pixels there, so the fill meets its border exactly.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.schedules import gamma_func
from models.VQGAN_Transformer import ORDERINGS, MaskGit
from sampler.latent_mask import latent_known_mask
from utils.image import denormalize, diffuse_fill, to_uint8
from utils.precision import autocast

HALTON_POINTS_PER_CELL = 16  # Halton points drawn per grid cell; the 16x16 grid has every cell hit within 685 points


@dataclass
class DecodeOutput:
    """tokens [B, N]: the result. With keep_steps, per step: `step_tokens` [B, N] (that step's candidates in
    every position still masked before it) and `step_masks` bool [B, N] (True = still masked after it)."""
    tokens: torch.Tensor
    step_tokens: list[torch.Tensor] = field(default_factory=list)
    step_masks: list[torch.Tensor] = field(default_factory=list)


@dataclass
class InpaintOutput:
    """images: uint8 [B, H, W, 3]; masked: the input in uint8; known_tokens: bool [B, N] (the latent mask,
    True = known); decode: the tokens; split and seam_blend: how `images` were made from them."""
    images: np.ndarray
    masked: np.ndarray
    known_tokens: torch.Tensor
    decode: DecodeOutput
    split: str = "test"
    seam_blend: bool = False


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise drawn on the generator's device (so a CPU seed also drives CUDA runs)."""
    u = torch.rand(shape, generator=generator, device=generator.device if generator is not None else device)
    return -torch.log(-torch.log(u.clamp_(min=1e-20))).to(device)


def _sample(logp: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of log-probabilities [M, K] by inverse CDF: one uniform per row from `generator`."""
    cdf = logp.exp().cumsum(dim=-1)
    u = torch.rand(logp.shape[0], 1, generator=generator,
                   device=generator.device if generator is not None else logp.device).to(logp.device)
    # scaling by the total mass keeps u below the last CDF value; right=True never picks a zero-probability code
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp_(max=logp.shape[-1] - 1)


def _radical_inverse(n: np.ndarray, base: int) -> np.ndarray:
    """The van der Corput radical inverse of each integer in n: its base-`base` digits mirrored behind the point."""
    n, out, scale = n.copy(), np.zeros(len(n)), 1.0
    while n.any():
        scale /= base
        out += scale * (n % base)
        n //= base
    return out


@functools.cache
def _halton_cells(h: int, w: int) -> tuple[int, ...]:
    points = np.arange(1, HALTON_POINTS_PER_CELL * h * w + 1)
    cells = (np.floor(_radical_inverse(points, 3) * h) * w + np.floor(_radical_inverse(points, 2) * w)).astype(int)
    hit, first = np.unique(cells, return_index=True)
    never = np.setdiff1d(np.arange(h * w), hit)  # ascending: row-major
    return tuple(hit[np.argsort(first)].tolist() + never.tolist())


def halton_order(h: int, w: int) -> torch.Tensor:
    """The row-major cell indices [h * w] of an h x w grid in the order the 2D Halton sequence reaches them.

    Point i = 1, 2, ... is (radical inverse of i in base 3, in base 2) scaled to (row, column) and floored; each
    cell is placed at its first hit. Cells still not hit after HALTON_POINTS_PER_CELL * h * w points (none on the
    grids used here) follow in row-major order. Built once per grid size.
    """
    return torch.tensor(_halton_cells(h, w))


def _halton_confidence(n: int, device: torch.device) -> torch.Tensor:
    """Minus each position's place in the Halton order of the square latent grid of n tokens: [n], higher = earlier."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"halton ordering needs a square latent grid, got {n} tokens")
    place = torch.empty(n)
    place[halton_order(side, side)] = torch.arange(n, dtype=torch.float32)
    return -place.to(device)


def step_temperature(t: int, total_iter: int, temperature: float, final_temperature: float | None) -> float:
    """The sampling temperature of step t (module docstring, item 2)."""
    if final_temperature is None or total_iter == 1:
        return temperature
    return temperature + (final_temperature - temperature) * t / (total_iter - 1)


@torch.inference_mode()
def decode(transformer: nn.Module, tokens: torch.Tensor, masked: torch.Tensor, *, total_iter: int = 8,
           gamma_type: str = "cosine", sweet_spot: int | None = None, temperature: float = 1.0,
           final_temperature: float | None = None, choice_temperature: float = 4.5, argmax: bool = False,
           generator: torch.Generator | None = None, amp: str = "bf16", keep_steps: bool = False,
           logit_bias: torch.Tensor | None = None, ordering: str = "confidence",
           pixels: tuple[torch.Tensor, torch.Tensor] | None = None,
           on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> DecodeOutput:
    """Fill the `masked` (bool [B, N]) positions of `tokens` (LongTensor [B, N]) by the rule in the module docstring.

    The transformer (in eval mode) needs `.mask_token_id` and `.num_codebook_vectors`. amp ('bf16' or 'none',
    utils.precision) is the precision of its forward; the softmax, sampling and ranking are always fp32.
    `logit_bias` [B, N, K] (e.g. pixel_evidence) is added to the logits of the real codes before the softmax.
    `pixels` (the normalized masked images and their pixel_known) goes to a transformer with pixel conditioning at
    every step: the known pixels stay the same while the tokens are filled in.
    `on_step(t, filled, still_masked)`, called after every step with the step_tokens and step_masks that
    keep_steps keeps, lets a caller show each step as soon as it is computed.
    """
    if ordering not in ORDERINGS:
        raise ValueError(f"unknown ordering {ordering!r}; choose one of {', '.join(ORDERINGS)}")
    if total_iter < 1:
        raise ValueError(f"total_iter must be >= 1, got {total_iter}")
    steps = total_iter if sweet_spot is None else sweet_spot
    if not 1 <= steps <= total_iter:
        raise ValueError(f"sweet_spot must be in 1..{total_iter}, got {sweet_spot}")
    gamma = gamma_func(gamma_type)
    mask_id, k = transformer.mask_token_id, transformer.num_codebook_vectors
    num_masked = masked.sum(dim=1).double()  # m_b
    cur = masked.clone()
    tokens = tokens.masked_fill(cur, mask_id)
    halton = _halton_confidence(cur.shape[1], tokens.device) if ordering == "halton" else None
    step_tokens, step_masks = [], []
    for t in range(steps):
        with autocast(tokens.device, amp):
            logits = transformer(tokens) if pixels is None else transformer(tokens, pixels=pixels)
        logits = logits[cur][:, :k].float()  # [M, K], masked rows only
        if logit_bias is not None:
            logits = logits + logit_bias[cur]
        logp = (logits / step_temperature(t, total_iter, temperature, final_temperature)).log_softmax(dim=-1)
        cand = logp.argmax(dim=-1) if argmax else _sample(logp, generator)
        filled = tokens.masked_scatter(cur, cand)
        if halton is not None:
            conf = torch.where(cur, halton, math.inf)
        else:
            conf = torch.full(cur.shape, math.inf, device=tokens.device)
            conf[cur] = logp.gather(1, cand[:, None]).squeeze(1)
            if choice_temperature > 0:
                conf += choice_temperature * (1 - t / total_iter) * gumbel_noise(cur.shape, generator, tokens.device)
        n_t = torch.ceil(gamma((t + 1) / total_iter) * num_masked).long().to(tokens.device)
        ranks = conf.argsort(dim=1, stable=True).argsort(dim=1)
        cur = ranks < n_t[:, None]  # +inf ranks last and n_t <= the masked count, so only candidates re-mask
        tokens = filled.masked_fill(cur, mask_id)
        if keep_steps:
            step_tokens.append(filled)
            step_masks.append(cur)
        if on_step is not None:
            on_step(t, filled, cur)
    return DecodeOutput(filled, step_tokens, step_masks)


def tokens_to_uint8(model: MaskGit, tokens: torch.Tensor, base: np.ndarray | None = None,
                    pixel_known: torch.Tensor | None = None, split: str = "test", seam_blend: bool = False
                    ) -> np.ndarray:
    """VQGAN-decode tokens [B, N] to uint8 [B, H, W, 3]; with `base` (uint8 [B, H, W, 3]) and `pixel_known`
    (bool [B, 1, H, W]) the known pixels are pasted back from `base`, in uint8 so that they are exact, after the
    seam blend (module docstring) when asked."""
    with torch.inference_mode():
        decoded = model.detokenize(tokens, split)
        if seam_blend and base is not None:
            known = pixel_known.reshape(base.shape[0], 1, base.shape[1], base.shape[2]).to(decoded.device)
            target = torch.from_numpy(base).to(decoded.device).permute(0, 3, 1, 2).float() / 255
            decoded = (decoded + diffuse_fill(target - decoded, known)).clamp_(0, 1)
        images = to_uint8(decoded)
    if base is None:
        return images
    keep = pixel_known.reshape(base.shape[0], base.shape[1], base.shape[2], 1).cpu().numpy()
    return np.where(keep, base, images)


def pixel_evidence(model: MaskGit, images: torch.Tensor, pixel_known: torch.Tensor, strength: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel guidance (module docstring): the tokens [B, N] of the diffusion-filled `images` and the logit bias
    [B, N, K], from one encoder pass and one code-distance matrix. Distances are divided by each image's median
    distance to the nearest code, so that `strength` does not depend on the VQGAN's latent scale."""
    d = model.code_distances(diffuse_fill(images, pixel_known))
    res = model.latent_resolution
    nearest = d.min(dim=-1)
    scale = nearest.values.median(dim=1).values.clamp(min=1e-12)
    known_fraction = F.avg_pool2d(pixel_known.float(), pixel_known.shape[-1] // res).flatten(1)  # [B, N]
    return nearest.indices, -strength * known_fraction[..., None] * d / scale[:, None, None]


@torch.inference_mode()
def inpaint(model: MaskGit, images: torch.Tensor, pixel_known: torch.Tensor, *, paste_back: bool = True,
            split: str = "test", total_iter: int = 8, gamma_type: str | None = None,
            choice_temperature: float | None = None, pixel_guidance: float = 0.0, seam_blend: bool = False,
            **decode_kwargs) -> InpaintOutput:
    """Inpaint a batch: normalized masked images [B, 3, H, W] and pixel masks bool [B, 1, H, W] (True = known).

    gamma_type and choice_temperature default to the model's config; pixel_guidance and seam_blend are the module
    docstring's additions (seam_blend needs paste_back); decode_kwargs (sweet_spot, temperature, final_temperature,
    argmax, generator, amp, keep_steps, ordering, on_step) go to decode.
    The VQGAN runs in fp32, once to encode and once to decode; step images are left to the caller. A transformer
    with pixel conditioning reads the known pixels of `images` (never its hole pixels) at every step.
    """
    known = latent_known_mask(pixel_known, model.latent_resolution)
    if pixel_guidance > 0:
        indices, bias = pixel_evidence(model, images, pixel_known, pixel_guidance)
    else:
        (_, indices), bias = model.encode_to_z(images), None
    pixels = (images, pixel_known) if model.transformer.pixel_conditioning else None
    result = decode(model.transformer, indices, ~known, total_iter=total_iter, pixels=pixels,
                    gamma_type=gamma_type or model.gamma_type,
                    choice_temperature=model.choice_temperature if choice_temperature is None else choice_temperature,
                    logit_bias=bias, **decode_kwargs)
    # the masked input, back in uint8: normalize -> denormalize -> round is exact for every 8-bit value
    masked = to_uint8(denormalize(images.float(), split))
    images = tokens_to_uint8(model, result.tokens, masked if paste_back else None, pixel_known, split, seam_blend)
    return InpaintOutput(images, masked, known, result, split, seam_blend and paste_back)
