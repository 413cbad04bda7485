"""Multi-head self-attention written out by hand (the lab forbids torch's fused attention modules)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn


CHUNK_BYTES = 2 ** 21  # the attention scores of a chunk of heads: they stay in a core's L2 cache (2 MB on the Xeon)


def keep_mask(shape: tuple[int, ...], p: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """A dropout mask (bool, True = kept with probability 1 - p, p rounded to a multiple of 2^-16), into `out` if
    given.

    CPU bernoulli_ draws one random number per element (~70M/s on this machine); one random 64-bit word gives
    four uniform 16-bit integers, which makes the mask several times cheaper.
    """
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # full 64-bit range
    return torch.ge(words.view(torch.int16)[:n].view(shape), round(p * 65536) - 32768, out=out)


def as_factor(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as 0/1 in `dtype`, to multiply by: via uint8, since the CPU converts bool to a float type in a
    scalar loop (6x slower) and a multiply by a bool tensor converts it that way first."""
    return mask.view(torch.uint8).to(dtype)


class Dropout(nn.Dropout):
    """nn.Dropout with a cheaper mask on the CPU (keep_mask); same distribution up to rounding p to a multiple of
    2^-16. x * mask is a vectorized multiply (torch.where is a scalar loop)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.compile fuses the native dropout into its generated kernels: keep it there
        if not (self.training and 0.0 < self.p < 1.0 and x.is_cpu) or torch.compiler.is_compiling():
            return super().forward(x)
        return (x * as_factor(keep_mask(x.shape, self.p), x.dtype)).mul_(1.0 / (1.0 - self.p))


def _chunks(total: int, rows: int, item_bytes: int) -> list[slice]:
    """Slices of `total` heads whose [rows, rows] scores together fit in CHUNK_BYTES."""
    size = max(1, CHUNK_BYTES // (rows * rows * item_bytes))
    return [slice(i, i + size) for i in range(0, total, size)]


class _ChunkedAttention(torch.autograd.Function):
    """qkv [B, N, 3*dim] -> the heads' softmax(scale Q K^T) V, dropout p on the probabilities, concatenated [B, N, dim],
    forward and backward written out over chunks of heads.

    Autograd's version writes every [B*heads, N, N] intermediate (scores, probabilities, dropped probabilities,
    their gradients) to memory and reads it back, and on the CPU those passes cost more than the matmuls; here each
    chunk's scores stay in cache and only the probabilities (and the dropout mask) are kept for the backward.
    """

    @staticmethod
    def forward(ctx: Any, qkv: torch.Tensor, num_heads: int, scale: float, p: float) -> torch.Tensor:
        b, n, _ = qkv.shape
        q, k, v = qkv.view(b, n, 3, num_heads, -1).permute(2, 0, 3, 1, 4).reshape(3, b * num_heads, n, -1)
        probs = qkv.new_empty(b * num_heads, n, n)
        keep = torch.empty(probs.shape, dtype=torch.bool) if p > 0 else None
        out = torch.empty_like(q)
        for c in _chunks(len(probs), n, probs.element_size()):
            a = probs[c]
            torch.baddbmm(a, q[c], k[c].transpose(1, 2), beta=0, alpha=scale, out=a)
            torch.ops.aten._softmax.out(a, -1, False, out=a)
            if keep is not None:
                a = a * as_factor(keep_mask(a.shape, p, out=keep[c]), a.dtype)
            torch.baddbmm(out[c], a, v[c], beta=0, alpha=1.0 / (1.0 - p), out=out[c])
        ctx.save_for_backward(q, k, v, probs, keep)
        ctx.scale, ctx.p = scale, p
        return out.view(b, num_heads, n, -1).transpose(1, 2).reshape(b, n, -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, probs, keep = ctx.saved_tensors
        heads_total, n, head_dim = q.shape
        b = grad.shape[0]
        grad = grad.reshape(b, n, -1, head_dim).transpose(1, 2).reshape(heads_total, n, head_dim)
        dqkv = torch.empty((3,) + q.shape, dtype=q.dtype)
        dq, dk, dv = dqkv
        drop_scale = 1.0 / (1.0 - ctx.p)
        for c in _chunks(heads_total, n, probs.element_size()):
            a = probs[c]
            dp = a.new_empty(a.shape)  # the gradient of the probabilities, first of the dropped ones
            torch.baddbmm(dp, grad[c], v[c].transpose(1, 2), beta=0, alpha=drop_scale, out=dp)
            dropped = a
            if keep is not None:
                factor = as_factor(keep[c], a.dtype)
                dropped = a * factor
                dp.mul_(factor)
            torch.baddbmm(dv[c], dropped.transpose(1, 2), grad[c], beta=0, alpha=drop_scale, out=dv[c])
            torch.ops.aten._softmax_backward_data.out(dp, a, -1, a.dtype, grad_input=dp)
            torch.baddbmm(dq[c], dp, k[c], beta=0, alpha=ctx.scale, out=dq[c])
            torch.baddbmm(dk[c], dp.transpose(1, 2), q[c], beta=0, alpha=ctx.scale, out=dk[c])
        dqkv = dqkv.view(3, b, -1, n, head_dim).permute(1, 3, 0, 2, 4).reshape(b, n, -1)
        return dqkv, None, None, None


class MultiHeadAttention(nn.Module):
    """softmax(Q K^T / sqrt(d_head)) V over `num_heads` heads, then the output projection W_O.

    Q, K and V come from one fused Linear (dim -> 3*dim, rows ordered q | k | v and head-major inside
    each), the same layout as the in_proj_weight of PyTorch's built-in attention module, so weights
    convert by plain copy. All heads run in one batched matmul; on the CPU (eager) in chunks of heads, with the
    backward written out (_ChunkedAttention), elsewhere (CUDA, torch.compile) as autograd's plain math.
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
        return self.proj(self.heads(x))

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, dim] -> the heads' outputs concatenated, [B, N, dim], before W_O: the only step that mixes
        positions (the rest of a layer is row-wise, so its caller may run it on some rows only)."""
        p = self.attn_drop.p if self.training else 0.0
        if x.is_cpu and p < 1.0 and not torch.compiler.is_compiling():
            return _ChunkedAttention.apply(self.qkv(x), self.num_heads, self.scale, p)
        b, n, dim = x.shape
        # [B, N, 3*dim] -> 3 x [B, H, N, dh]: strided views, copied only where the matmuls need it
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # scaling q ([B,H,N,dh]) costs N/dh times less than scaling the scores ([B,H,N,N])
        attn = self.attn_drop(torch.matmul(q * self.scale, k.transpose(-2, -1)).softmax(dim=-1))
        out = torch.matmul(attn, v)  # [B, H, N, dh]
        return out.transpose(1, 2).reshape(b, n, dim)
