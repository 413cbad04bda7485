"""The lab skeleton's decoding loop: one image at a time, fp32, a VQGAN decode after every step.

The same rule as sampler.maskgit_sampler.decode, written the lab's way (topk of the n least confident tokens,
torch.multinomial for sampling). Kept as the oracle of the batched decoder (tests/test_sampler.py: with argmax in
fp32 both give identical tokens) and as the baseline of benchmarks/inpaint_throughput.py.
"""
from __future__ import annotations

import math

import torch

from models.VQGAN_Transformer import MaskGit
from sampler.latent_mask import latent_known_mask
from sampler.maskgit_sampler import gumbel_noise


@torch.inference_mode()
def lab_way_inpaint(model: MaskGit, image: torch.Tensor, pixel_known: torch.Tensor, total_iter: int = 8,
                    gamma_type: str = "cosine", sweet_spot: int | None = None, argmax: bool = False,
                    temperature: float = 1.0, choice_temperature: float = 4.5,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """ONE normalized image [1, 3, H, W] -> (tokens [1, N], the normalized image decoded after every step)."""
    mask_bc = ~latent_known_mask(pixel_known, model.latent_resolution)
    _, z_indices = model.encode_to_z(image)
    mask_num = int(mask_bc.sum())
    gamma = model.gamma_func(gamma_type)
    pixels = (image, pixel_known) if model.transformer.pixel_conditioning else None
    decoded = []
    for step in range(total_iter):
        if step == sweet_spot:
            break
        logits = model.transformer(torch.where(mask_bc, model.mask_token_id, z_indices), pixels=pixels)
        logits = logits[..., :model.mask_token_id]
        logp = (logits / temperature).log_softmax(dim=-1)
        if argmax:
            idx = logp.argmax(dim=-1)
        else:
            idx = torch.multinomial(logp[0].exp(), 1, generator=generator).view(1, -1)
        z_indices = torch.where(mask_bc, idx, z_indices)
        confidence = logp.gather(-1, idx[..., None]).squeeze(-1)
        if choice_temperature > 0:
            confidence = confidence + choice_temperature * (1 - step / total_iter) * gumbel_noise(
                confidence.shape, generator, confidence.device)
        confidence[~mask_bc] = math.inf
        n = math.ceil(float(gamma((step + 1) / total_iter)) * mask_num)
        mask_bc = torch.zeros_like(mask_bc)
        mask_bc[0, torch.topk(confidence[0], n, largest=False).indices] = True
        decoded.append(model.decode_tokens(z_indices))
    return z_indices, decoded
