"""What runs fast on this device: bf16 autocast and channels_last only pay where the hardware has bf16 units.

On a CPU with AMX or AVX512-BF16 a bf16 matmul runs several times faster than fp32, and 3x3 convolutions in
channels_last 1.5-3x faster than in the default layout. On an AVX2-only CPU (this project's AMD EPYC) oneDNN has
no bf16 kernels: a bf16 matmul is emulated at 1.1 GFLOP/s against 86 in fp32 (80x slower), and channels_last
gains nothing (fp32 3x3 convs at 16-128 channels: 45-100 GFLOP/s in either layout). On an AVX-512 CPU without
bf16 units (a Xeon whose VM hides AMX and AVX512-BF16) oneDNN still says it supports bf16, but emulates it: the
long run's step took 3.1 s in bf16 against 0.86 s in fp32 there. So every script's default precision is 'auto',
decided here once, from the CPU's own flags where it lists them.
"""
from __future__ import annotations

import functools
import platform
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

AMP_CHOICES = ["auto", "bf16", "none"]


@functools.cache
def _bf16_is_fast(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device_type == "cpu" and cpu_has_bf16_units(cpu_flags(), torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_has_bf16_units(flags: set[str] | None, onednn_bf16: bool) -> bool:
    """Whether bf16 matmuls run on bf16 units: an x86 CPU needs AMX or AVX512-BF16 in its flags (oneDNN also claims
    bf16 on plain AVX-512, which it emulates); elsewhere (no x86 flags, e.g. ARM) oneDNN's own answer."""
    if flags is None:
        return onednn_bf16
    return onednn_bf16 and bool(flags & BF16_UNITS)


def bf16_is_fast(device: torch.device | str) -> bool:
    """True where bf16 compute beats fp32: CUDA with native bf16, or a CPU with oneDNN bf16 kernels (AVX512-BF16,
    AMX, ARM bf16)."""
    return _bf16_is_fast(torch.device(device).type)


def resolve_amp(amp: str, device: torch.device | str) -> str:
    """'auto' -> 'bf16' where bf16 is fast on this device, else 'none'; 'bf16' and 'none' are kept."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp {amp!r}: choose one of {AMP_CHOICES}")
    if amp != "auto":
        return amp
    return "bf16" if bf16_is_fast(device) else "none"


def autocast(device: torch.device | str, amp: str) -> AbstractContextManager:
    """bf16 autocast or nothing, after resolving 'auto'; bf16 needs no loss scaling on CPU or CUDA."""
    device = torch.device(device)
    if resolve_amp(amp, device) == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def conv_memory_format(device: torch.device | str) -> torch.memory_format:
    """channels_last where the convolution kernels are tuned for it (bf16 hardware), the default layout elsewhere."""
    return torch.channels_last if bf16_is_fast(device) else torch.contiguous_format


# /proc/cpuinfo flags, widest first: the units a CPU's matmuls run on, which decide both the precision and what a
# speed figure can be compared with (a VM's model name may not say: our Xeon is "Intel(R) Xeon(R) Processor")
CPU_MATMUL_UNITS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"), ("avx2", "AVX2"))
BF16_UNITS = {"amx_bf16", "avx512_bf16"}
CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_fields() -> list[list[str]]:
    try:
        return [line.split(":", 1) for line in CPUINFO.read_text().splitlines() if ":" in line]
    except OSError:
        return []


def cpu_flags() -> set[str] | None:
    """The first CPU's x86 feature flags from /proc/cpuinfo (None where there are none: not x86, or no cpuinfo)."""
    return next((set(value.split()) for key, value in _cpuinfo_fields() if key.strip() == "flags"), None)


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's model name and its widest matmul units, e.g. "Intel(R) Xeon(R) Processor (AMX)",
    for the records of which machine a measurement ran on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    names = [value.strip() for key, value in _cpuinfo_fields() if key.strip() == "model name"]
    flags = cpu_flags() or set()
    units = next((label for flag, label in CPU_MATMUL_UNITS if flag in flags), None)
    name = names[0] if names else platform.processor() or "unknown CPU"
    return f"{name} ({units})" if units else name
