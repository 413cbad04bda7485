"""Stage 1: the lab-compatible VQGAN."""
from __future__ import annotations

from pathlib import Path

import torch

from utils.checkpoint import load_state_dict_strict, load_weights
from utils.config import load_config

from .vqgan import MODEL_PARAM_KEYS, VQGAN

__all__ = ["VQGAN", "load_vqgan", "load_vqgan_config"]


def load_vqgan_config(config_path: str | Path) -> dict:
    """The `model_param` section of a VQGAN YAML config, checked for every key."""
    return load_config(config_path, required={"model_param": MODEL_PARAM_KEYS})["model_param"]


def load_vqgan(config_path: str | Path, ckpt_path: str | Path, device: str | torch.device = "cpu") -> VQGAN:
    """Build the VQGAN of a config and load its weights strictly; eval mode, frozen."""
    model = VQGAN(load_vqgan_config(config_path))
    load_state_dict_strict(model, load_weights(ckpt_path), source=str(ckpt_path))
    model.requires_grad_(False)
    return model.to(device).eval()
