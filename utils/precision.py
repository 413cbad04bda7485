"""What runs fast on this device: bf16 autocast and channels_last only pay where the hardware has bf16 units.

On a CPU with AMX or AVX512-BF16 a bf16 matmul runs several times faster than fp32, and 3x3 convolutions in
channels_last 1.5-3x faster than in the default layout; on an AVX2-only CPU (e.g. an AMD EPYC without
AVX512) bf16 is emulated and about 80x *slower* than fp32 (1.1 vs 86 GFLOP/s measured on one), and
channels_last gains nothing. So 'auto' measures instead of assuming: a 256^3 matmul in both precisions, once
per process and device type.
"""
from __future__ import annotations

import functools
import time
from contextlib import AbstractContextManager, nullcontext

import torch

AMP_CHOICES = ["auto", "bf16", "none"]


@functools.cache
def bf16_is_fast(device_type: str) -> bool:
    """True where bf16 compute beats fp32: CUDA with bf16 support, or a CPU on which a bf16 matmul is faster."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    a = torch.randn(256, 256)

    def seconds(dtype: torch.dtype) -> float:
        x = a.to(dtype)
        torch.mm(x, x)
        t0 = time.perf_counter()
        for _ in range(3):
            torch.mm(x, x)
        return time.perf_counter() - t0

    return seconds(torch.bfloat16) < seconds(torch.float32)


def resolve_amp(amp: str, device: torch.device | str) -> str:
    """'auto' -> 'bf16' where bf16 is fast on this device, else 'none'; 'bf16' and 'none' are kept."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp {amp!r}: choose one of {AMP_CHOICES}")
    if amp != "auto":
        return amp
    return "bf16" if bf16_is_fast(torch.device(device).type) else "none"


def autocast(device: torch.device | str, amp: str) -> AbstractContextManager:
    """bf16 autocast or nothing, after resolving 'auto'; bf16 needs no loss scaling on CPU or CUDA."""
    device = torch.device(device)
    if resolve_amp(amp, device) == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def conv_memory_format(device: torch.device | str) -> torch.memory_format:
    """channels_last where the convolution kernels are tuned for it (bf16 hardware), the default layout elsewhere."""
    return torch.channels_last if bf16_is_fast(torch.device(device).type) else torch.contiguous_format
