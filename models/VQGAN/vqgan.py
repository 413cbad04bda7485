"""The lab's VQGAN (stage 1): 64x64 image <-> 16x16 grid of codebook indices."""
from __future__ import annotations

import torch
import torch.nn as nn

from .codebook import Codebook
from .encoder_decoder import Decoder, Encoder

MODEL_PARAM_KEYS = ["image_channels", "enc_channels", "dec_channels", "latent_dim", "img_resolution",
                    "latent_resolution", "num_codebook_vectors", "beta"]


class VQGAN(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        missing = [k for k in MODEL_PARAM_KEYS if k not in cfg]
        if missing:
            raise KeyError(f"VQGAN model_param misses {missing}")
        self.latent_resolution = cfg["latent_resolution"]
        self.num_codebook_vectors = cfg["num_codebook_vectors"]
        self.latent_dim = cfg["latent_dim"]
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.codebook = Codebook(cfg)
        self.quant_conv = nn.Conv2d(cfg["latent_dim"], cfg["latent_dim"], 1)
        self.post_quant_conv = nn.Conv2d(cfg["latent_dim"], cfg["latent_dim"], 1)

    def encode_continuous(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-quantization latents [B, D, h, w]."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalized images [B,3,H,W] -> (z_q [B,D,h,w], indices [B*h*w] in b,h,w order, q_loss)."""
        return self.codebook(self.encode_continuous(x))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Token grid [B, h*w] or [B, h, w] -> normalized images."""
        return self.decode(self.codebook.lookup(indices, self.latent_resolution))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_q, indices, q_loss = self.encode(x)
        return self.decode(z_q), indices, q_loss

    def last_layer_weight(self) -> torch.Tensor:
        """Weight of the decoder's final conv, used by the adaptive GAN weight."""
        return self.decoder.model[-1].weight
