"""Vector quantizer: nearest code by squared distance, straight-through gradient."""
from __future__ import annotations

import torch
import torch.nn as nn


class Codebook(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.num_codebook_vectors = cfg["num_codebook_vectors"]
        self.latent_dim = cfg["latent_dim"]
        self.beta = cfg["beta"]
        self.embedding = nn.Embedding(self.num_codebook_vectors, self.latent_dim)
        self.embedding.weight.data.uniform_(-1.0 / self.num_codebook_vectors, 1.0 / self.num_codebook_vectors)

    def squared_distances(self, z_flat: torch.Tensor) -> torch.Tensor:
        """||z - e_k||^2 for each row of z_flat [M, D] and code k -> [M, K], in fp32 (bf16 ties break codes)."""
        with torch.autocast(z_flat.device.type, enabled=False):
            z = z_flat.float()
            e = self.embedding.weight.float()
            return (z * z).sum(1, keepdim=True) - 2 * z @ e.t() + (e * e).sum(1)[None]

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of z_flat [M, D]."""
        return self.squared_distances(z_flat).argmin(dim=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B,D,H,W] -> (z_q with straight-through gradient, indices [B*H*W] in b,h,w order, loss)."""
        z = z.float()
        z_bhwc = z.permute(0, 2, 3, 1).contiguous()
        indices = self.nearest(z_bhwc.view(-1, self.latent_dim))
        z_q = self.embedding(indices).view(z_bhwc.shape)
        # codebook loss pulls codes to encoder outputs, commitment (beta) pulls encoder outputs to codes
        loss = torch.mean((z_q.detach() - z_bhwc) ** 2) + self.beta * torch.mean((z_q - z_bhwc.detach()) ** 2)
        z_q = z_bhwc + (z_q - z_bhwc).detach()
        return z_q.permute(0, 3, 1, 2).contiguous(), indices, loss

    def lookup(self, indices: torch.Tensor, latent_resolution: int) -> torch.Tensor:
        """Indices [B, h*w] or [B, h, w] -> z_q [B, D, h, w]."""
        idx = indices.reshape(-1, latent_resolution, latent_resolution)
        return self.embedding(idx).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def restart_dead_codes(self, z_flat: torch.Tensor, dead: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """Move unused codes onto randomly chosen recent encoder outputs (guards against codebook collapse)."""
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        pick = torch.randint(0, z_flat.shape[0], (n_dead,), generator=generator, device="cpu").to(z_flat.device)
        noise = torch.randn(n_dead, self.latent_dim, generator=generator, device="cpu").to(z_flat.device) * 1e-3
        self.embedding.weight.data[dead] = z_flat[pick].float() + noise
        return n_dead
