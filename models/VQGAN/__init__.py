"""Stage 1: the lab-compatible VQGAN."""
from __future__ import annotations

from pathlib import Path

import torch

from utils.checkpoint import load_state_dict_strict, load_weights
from utils.config import ConfigError, load_config, require_positive_ints

from .encoder_decoder import check_channel_rules
from .vqgan import MODEL_PARAM_KEYS, VQGAN

SIZE_KEYS = ["image_channels", "enc_channels", "dec_channels", "latent_dim", "img_resolution", "latent_resolution",
             "num_codebook_vectors", "norm_groups", "enc_res_blocks", "dec_res_blocks"]

__all__ = ["VQGAN", "load_vqgan", "load_vqgan_config"]


def load_vqgan_config(config_path: str | Path) -> dict:
    """The `model_param` section of a VQGAN YAML config, checked for every key, for sizes that are whole numbers
    and for channel lists the layout can build, so that a bad config fails in one line naming the file."""
    cfg = load_config(config_path, required={"model_param": MODEL_PARAM_KEYS})["model_param"]
    require_positive_ints(cfg, SIZE_KEYS, "model_param", config_path)
    try:
        check_channel_rules(cfg)
    except ConfigError as e:
        raise ConfigError(f"{config_path}: model_param: {e}") from None
    return cfg


def load_vqgan(config_path: str | Path, ckpt_path: str | Path, device: str | torch.device = "cpu") -> VQGAN:
    """Build the VQGAN of a config and load its weights strictly; eval mode, frozen."""
    model = VQGAN(load_vqgan_config(config_path))
    load_state_dict_strict(model, load_weights(ckpt_path), source=str(ckpt_path))
    model.requires_grad_(False)
    return model.to(device).eval()
