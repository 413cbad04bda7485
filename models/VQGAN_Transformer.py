"""MaskGIT: a frozen VQGAN tokenizer plus a bidirectional transformer trained by masked visual token modeling.

MaskGit is the unit that travels between the trainer, the sampler and the scripts: it owns its mask schedule,
its loss, and the way between pixels and tokens (tokenize/detokenize, with the lab's normalization split), so
that nothing outside this file reaches into the VQGAN.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.Transformer import BidirectionalTransformer
from models.schedules import GAMMAS, gamma_func
from models.VQGAN import VQGAN, load_vqgan, load_vqgan_config
from utils.checkpoint import CheckpointError, load_state_dict_strict, load_weights
from utils.config import ConfigError, load_config, require_keys, require_positive_ints, resolve_path
from utils.image import IMAGE_SIZE, denormalize, normalize

DEFAULT_TRANSFORMER_CKPT = "./transformer_checkpoints/transformer_last.pt"  # where training_transformer.py writes
DECODINGS = ("sample", "argmax")
ORDERINGS = ("confidence", "halton")  # which still-masked tokens a decoding step fixes (sampler docstring)
MODEL_PARAM_KEYS = ["VQ_Configs", "num_image_tokens", "num_codebook_vectors", "choice_temperature", "gamma_type",
                    "Transformer_param"]
TRANSFORMER_KEYS = ["num_image_tokens", "num_codebook_vectors", "dim", "n_layers", "hidden_dim"]


def load_maskgit_config(path: str | Path) -> dict[str, Any]:
    """The `model_param` section of a MaskGit YAML config, checked for every key the model needs."""
    cfg = load_config(path, required={"model_param": MODEL_PARAM_KEYS})["model_param"]
    for section, keys in (("VQ_Configs", ["VQ_config_path", "VQ_CKPT_path"]), ("Transformer_param", TRANSFORMER_KEYS)):
        require_keys(cfg[section], keys, f"model_param.{section}", path)
    tp = cfg["Transformer_param"]
    require_positive_ints(cfg, ["num_image_tokens", "num_codebook_vectors"], "model_param", path)
    require_positive_ints(tp, TRANSFORMER_KEYS + ["num_heads", "image_size"], "model_param.Transformer_param", path)
    if tp["dim"] % tp.get("num_heads", 16):
        raise ConfigError(f"{path}: model_param.Transformer_param.dim ({tp['dim']}) must be a multiple of num_heads "
                          f"({tp.get('num_heads', 16)})")
    if not isinstance(tp.get("pixel_conditioning", False), bool):
        raise ConfigError(f"{path}: model_param.Transformer_param.pixel_conditioning is "
                          f"{tp['pixel_conditioning']!r}; use true or false")
    if tp.get("pixel_conditioning") and tp.get("image_size", IMAGE_SIZE) % math.isqrt(tp["num_image_tokens"]):
        raise ConfigError(f"{path}: model_param.Transformer_param.image_size must be a multiple of the latent grid's "
                          f"side ({math.isqrt(tp['num_image_tokens'])})")
    for key in ("dropout", "attn_dropout"):
        value = tp.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ConfigError(f"{path}: model_param.Transformer_param.{key} is {value!r}; use a number in [0, 1)")
    if cfg["gamma_type"] not in GAMMAS:
        raise ConfigError(f"{path}: model_param.gamma_type is {cfg['gamma_type']!r}; choose one of {', '.join(GAMMAS)}")
    for key in ("num_image_tokens", "num_codebook_vectors"):
        if tp[key] != cfg[key]:
            raise ConfigError(f"{path}: model_param.{key} ({cfg[key]}) differs from Transformer_param.{key} "
                              f"({tp[key]}); make them equal")
    decoding_choices(cfg, path)
    return cfg


def decoding_choices(cfg: dict[str, Any], path: str | Path = "config") -> dict[str, Any]:
    """The config's optional decoding keys (`decoding`, `pixel_guidance`, `seam_blend`, `ordering`, `temperature`,
    `final_temperature`; sampler docstring), checked; when absent, the lab's decoding: sampling at temperature 1,
    no pixel guidance, no seam blend, confidence ordering."""
    decoding = cfg.get("decoding", "sample")
    if decoding not in DECODINGS:
        raise ConfigError(f"{path}: model_param.decoding is {decoding!r}; use sample or argmax")
    ordering = cfg.get("ordering", "confidence")
    if ordering not in ORDERINGS:
        raise ConfigError(f"{path}: model_param.ordering is {ordering!r}; use confidence or halton")
    guidance = cfg.get("pixel_guidance", 0.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance < 0:
        raise ConfigError(f"{path}: model_param.pixel_guidance is {guidance!r}; use a number >= 0")
    blend = cfg.get("seam_blend", False)
    if not isinstance(blend, bool):
        raise ConfigError(f"{path}: model_param.seam_blend is {blend!r}; use true or false")
    temperatures = {"temperature": cfg.get("temperature", 1.0), "final_temperature": cfg.get("final_temperature")}
    for key, value in temperatures.items():
        if value is None and key == "final_temperature":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{path}: model_param.{key} is {value!r}; use a number > 0")
        temperatures[key] = float(value)
    return {"decoding": decoding, "pixel_guidance": float(guidance), "seam_blend": blend, "ordering": ordering,
            **temperatures}


def transformer_ckpt_path(cfg: dict[str, Any], override: str | Path | None = None) -> Path:
    """The transformer weights to load: the flag when given, else the config's `transformer_ckpt` (the shipped
    weights in configs/MaskGit_demo.yml), else what training_transformer.py writes by default."""
    return resolve_path(override or cfg.get("transformer_ckpt") or DEFAULT_TRANSFORMER_CKPT)


def _load_frozen_vqgan(vq_cfg: dict[str, Any]) -> VQGAN:
    config_path = resolve_path(vq_cfg["VQ_config_path"])
    ckpt_path = resolve_path(vq_cfg["VQ_CKPT_path"])
    load_vqgan_config(config_path)  # a config error names the config, not the checkpoint
    if not ckpt_path.is_file():
        raise CheckpointError(f"{ckpt_path}: VQGAN checkpoint not found (VQ_Configs.VQ_CKPT_path); train it with "
                              f"training_vqgan.py using {config_path}, or point VQ_CKPT_path at an existing VQGAN.pt")
    try:
        return load_vqgan(config_path, ckpt_path)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (VQ_Configs: is {config_path} the config this VQGAN was trained with?)") from e


def mask_tokens(indices: torch.Tensor, gamma: Callable[[torch.Tensor], torch.Tensor], mask_token_id: int,
                generator: torch.Generator | None = None, region: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """MVTM corruption: per sample draw r ~ U(0,1) and replace ceil(gamma(r) * N) random positions by the mask id.

    indices: LongTensor [B, N]. Returns (corrupted indices [B, N], mask bool [B, N], True = masked). Random
    numbers come from `generator` (on its device) when given, so validation can use the same masks every time.
    With `region` (bool [B, N]) the rule runs inside it: max(1, ceil(gamma(r) * |region|)) random positions of the
    region, none outside it (none at all for an empty region); the hole-aware training masks use it
    (training/train_masks.py), with the same random draws as without.
    """
    b, n = indices.shape
    device = generator.device if generator is not None else indices.device
    r = torch.rand(b, device=device, generator=generator)
    scores = torch.rand(b, n, device=device, generator=generator)
    if region is None:
        num_masked = torch.ceil(gamma(r) * n).long()  # gamma works in float64: no 1-ulp ceil surprises
    else:
        region = region.to(device)
        size = region.sum(dim=1)
        num_masked = torch.ceil(gamma(r) * size).long().clamp(min=1).minimum(size)
        scores = scores.masked_fill(~region, 2.0)  # above every draw in [0, 1): ranked after the region
    ranks = scores.argsort(dim=1).argsort(dim=1)
    mask = (ranks < num_masked[:, None]).to(indices.device)
    return indices.masked_fill(mask, mask_token_id), mask


def mvtm_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the masked positions only (mean over masked tokens), computed in fp32.

    logits: [B, N, ids] at every position, or [M, ids] at the masked ones only (the transformer's forward with
    `mask`, what training computes)."""
    masked = logits[mask] if logits.dim() == 3 else logits
    return F.cross_entropy(masked.float(), target[mask], label_smoothing=label_smoothing)


def masked_correct(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """(number of masked tokens whose argmax prediction is right, number of masked tokens)."""
    return int((logits[mask].argmax(dim=-1) == target[mask]).sum()), int(mask.sum())


class MaskGit(nn.Module):
    """cfg: the `model_param` section of configs/MaskGit.yml. The VQGAN is loaded from VQ_Configs and frozen."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.vqgan = _load_frozen_vqgan(cfg["VQ_Configs"])
        self.transformer = BidirectionalTransformer(cfg["Transformer_param"])
        if self.vqgan.num_codebook_vectors != cfg["num_codebook_vectors"]:
            raise ConfigError(f"num_codebook_vectors is {cfg['num_codebook_vectors']} but the VQGAN has "
                              f"{self.vqgan.num_codebook_vectors} codes; make the MaskGit config match the VQGAN")
        if self.vqgan.latent_resolution ** 2 != cfg["num_image_tokens"]:
            raise ConfigError(f"num_image_tokens is {cfg['num_image_tokens']} but the VQGAN makes "
                              f"{self.vqgan.latent_resolution}x{self.vqgan.latent_resolution} tokens; make them match")
        self.num_image_tokens = cfg["num_image_tokens"]
        self.latent_resolution = self.vqgan.latent_resolution
        self.mask_token_id = self.transformer.mask_token_id
        self.choice_temperature = cfg["choice_temperature"]
        self.gamma_type = cfg["gamma_type"]
        self.gamma = self.gamma_func(self.gamma_type)

    def train(self, mode: bool = True) -> "MaskGit":
        """Only the transformer ever trains; the VQGAN stays in eval mode."""
        super().train(mode)
        self.vqgan.eval()
        return self

    @staticmethod
    def gamma_func(mode: str = "cosine") -> Callable[[torch.Tensor | float], torch.Tensor]:
        """The mask scheduling function (the lab's method name); models.schedules is its only home."""
        return gamma_func(mode)

    def mask_tokens(self, indices: torch.Tensor, generator: torch.Generator | None = None,
                    region: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MVTM corruption with this model's schedule and mask id (see mask_tokens), optionally inside `region`."""
        return mask_tokens(indices, self.gamma, self.mask_token_id, generator, region)

    @staticmethod
    def loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, label_smoothing: float = 0.0
             ) -> torch.Tensor:
        """The MVTM loss: cross-entropy on the masked positions only (mvtm_loss)."""
        return mvtm_loss(logits, target, mask, label_smoothing)

    @torch.no_grad()
    def encode_to_z(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized images [B,3,H,W] -> (z_q [B,D,h,w], indices [B, h*w])."""
        z_q, indices, _ = self.vqgan.encode(x)
        return z_q, indices.view(x.shape[0], -1)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MVTM on token indices [B, N] (or normalized images, tokenized first) -> (logits, target, mask).

        The loss is mvtm_loss(logits, target, mask): cross-entropy on the masked positions only.
        """
        target = self.encode_to_z(x)[1] if x.is_floating_point() else x
        corrupted, mask = self.mask_tokens(target, generator)
        return self.transformer(corrupted), target, mask

    def load_transformer_checkpoint(self, path: str | Path) -> None:
        """Load a plain transformer state_dict (the lab's format, e.g. transformer_epoch_N.pt) strictly."""
        load_state_dict_strict(self.transformer, load_weights(path), source=str(path))

    @torch.no_grad()
    def decode_tokens(self, indices: torch.Tensor) -> torch.Tensor:
        """Token ids [B, N] (or [B, h, w]) -> normalized images [B, 3, H, W]."""
        return self.vqgan.decode_indices(indices)

    def tokenize(self, images: torch.Tensor, split: str = "test") -> torch.Tensor:
        """[0,1] images [B,3,H,W] -> token ids [B, N], normalized with the statistics of `split` (utils.image)."""
        return self.encode_to_z(normalize(images, split))[1]

    def detokenize(self, indices: torch.Tensor, split: str = "test") -> torch.Tensor:
        """Token ids [B, N] -> [0,1] images [B,3,H,W] in fp32, de-normalized with the statistics of `split`."""
        return denormalize(self.decode_tokens(indices).float(), split)

    @torch.no_grad()
    def code_distances(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized images [B,3,H,W] -> squared distance of each pre-quantization latent to each code [B, N, K]."""
        z = self.vqgan.encode_continuous(x).float()
        d = self.vqgan.codebook.squared_distances(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
        return d.view(x.shape[0], self.num_image_tokens, -1)
