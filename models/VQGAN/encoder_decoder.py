"""Encoder and decoder built from the channel lists of the config.

The lab's layout follows two rules that also scale to smaller configs:
- encoder: stages of `enc_res_blocks` (2) residual blocks, enc_channels[i] -> enc_channels[i+1]; a stage
  that widens the channels ends with a 2x downsample;
- decoder: reversed dec_channels, stages of `dec_res_blocks` (3) residual blocks (attention after each
  block of the first stage, which runs at the latent resolution); a 2x upsample precedes a stage that narrows.
With the lab's channel lists and the defaults this reproduces vqgan_state_dict.tsv exactly (a test checks
it). `norm_groups` (32) and the block counts are optional keys so that a CPU-sized config can be cheaper.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from utils.config import ConfigError

from .layers import DownSampleBlock, GroupNorm, NonLocalBlock, ResidualBlock, Swish, UpSampleBlock


def _num_resamples(cfg: dict) -> int:
    ratio = cfg["img_resolution"] / cfg["latent_resolution"]
    steps = int(round(math.log2(ratio)))
    if ratio < 1 or 2 ** steps != ratio:
        raise ConfigError(f"img_resolution / latent_resolution must be a power of two, got {ratio}")
    return steps


def check_channel_rules(cfg: dict) -> None:
    """ConfigError for channel lists that the two layout rules cannot build: one resample per widening
    (encoder) or narrowing (decoder) stage, and every width a multiple of norm_groups."""
    steps = _num_resamples(cfg)
    enc, dec = list(cfg["enc_channels"]), list(cfg["dec_channels"])
    widening = sum(enc[i + 1] > enc[i] for i in range(len(enc) - 1))
    if widening != steps:
        raise ConfigError(f"enc_channels {enc} widen {widening} times but img_resolution/latent_resolution "
                          f"needs {steps} downsamples (one per widening stage)")
    narrowing = sum(dec[i + 1] > dec[i] for i in range(len(dec) - 1))
    if narrowing != steps:
        raise ConfigError(f"dec_channels {dec} narrow {narrowing} times but the decoder needs "
                          f"{steps} upsamples (one per narrowing stage)")
    groups = cfg.get("norm_groups", 32)
    if any(c % groups for c in enc + dec):
        raise ConfigError(f"every entry of enc_channels {enc} and dec_channels {dec} must be a multiple of "
                          f"norm_groups ({groups})")


class Encoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        check_channel_rules(cfg)
        ch, g = list(cfg["enc_channels"]), cfg.get("norm_groups", 32)
        layers: list[nn.Module] = [nn.Conv2d(cfg["image_channels"], ch[0], 3, 1, 1)]
        for c_in, c_out in zip(ch[:-1], ch[1:]):
            for j in range(cfg.get("enc_res_blocks", 2)):
                layers.append(ResidualBlock(c_in if j == 0 else c_out, c_out, g))
            if c_out > c_in:
                layers.append(DownSampleBlock(c_out))
        top = ch[-1]
        layers += [ResidualBlock(top, top, g), NonLocalBlock(top, g), ResidualBlock(top, top, g),
                   GroupNorm(top, g), Swish(), nn.Conv2d(top, cfg["latent_dim"], 3, 1, 1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class Decoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        check_channel_rules(cfg)
        ch, g = list(reversed(cfg["dec_channels"])), cfg.get("norm_groups", 32)
        c = ch[0]
        layers: list[nn.Module] = [nn.Conv2d(cfg["latent_dim"], c, 3, 1, 1),
                                   ResidualBlock(c, c, g), NonLocalBlock(c, g), ResidualBlock(c, c, g)]
        for i, c_out in enumerate(ch):
            if c_out < c:
                layers.append(UpSampleBlock(c))
            for j in range(cfg.get("dec_res_blocks", 3)):
                layers.append(ResidualBlock(c if j == 0 else c_out, c_out, g))
                if i == 0:
                    layers.append(NonLocalBlock(c_out, g))
            c = c_out
        layers += [GroupNorm(c, g), nn.Conv2d(c, cfg["image_channels"], 3, 1, 1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
