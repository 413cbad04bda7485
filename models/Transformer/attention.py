"""Multi-head self-attention written out by hand (the lab forbids torch's fused attention modules)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class Dropout(nn.Dropout):
    """nn.Dropout with a cheaper mask on the CPU; same distribution up to rounding p to a multiple of 2^-16.

    CPU bernoulli_ draws one random number per element (~70M/s on this machine) and the lab model drops ~350M
    activations per training step at batch 16 (mostly attention probabilities); one random 64-bit word
    gives four uniform 16-bit integers, which makes dropout up to twice as fast (less when memory-bound).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.compile fuses the native dropout into its generated kernels: keep it there
        if not (self.training and 0.0 < self.p < 1.0 and x.is_cpu) or torch.compiler.is_compiling():
            return super().forward(x)
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # full 64-bit range
        keep = words.view(torch.int16)[:n].view(x.shape) >= round(self.p * 65536) - 32768
        return torch.where(keep, x, 0.0).mul_(1.0 / (1.0 - self.p))  # autograd keeps only the 1-byte mask


class MultiHeadAttention(nn.Module):
    """softmax(Q K^T / sqrt(d_head)) V over `num_heads` heads, then the output projection W_O.

    Q, K and V come from one fused Linear (dim -> 3*dim, rows ordered q | k | v and head-major inside
    each), the same layout as the in_proj_weight of PyTorch's built-in attention module, so weights
    convert by plain copy. All heads run in one batched matmul.
    Under bf16 autocast the scores are bf16 and so is the softmax (the CPU kernel accumulates in fp32); an fp32
    softmax output measured no more accurate, since A @ V consumes bf16 anyway.
    """

    def __init__(self, dim: int = 768, num_heads: int = 16, attn_dropout: float = 0.1) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = Dropout(attn_dropout)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, dim] -> [B, N, dim]."""
        b, n, dim = x.shape
        # [B, N, 3*dim] -> 3 x [B, H, N, dh]: strided views, copied only where the matmuls need it
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # scaling q ([B,H,N,dh]) costs N/dh times less than scaling the scores ([B,H,N,N])
        attn = self.attn_drop(torch.matmul(q * self.scale, k.transpose(-2, -1)).softmax(dim=-1))
        out = torch.matmul(attn, v)  # [B, H, N, dh]
        return self.proj(out.transpose(1, 2).reshape(b, n, dim))
