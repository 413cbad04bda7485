"""Mask scheduling functions gamma: [0,1] -> [0,1], gamma(0)=1 (all masked), gamma(1)=0.

Training draws r ~ U(0,1) and masks ceil(gamma(r) * N) tokens; decoding keeps
ceil(gamma((t+1)/T) * N_masked) tokens masked after step t. This module is the only home of gamma: MaskGit
owns its schedule (MaskGit.gamma_func), and the sampler reads it from here, below itself.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

_LOG_EPS = 1e-3  # log/exp schedules are singular at the ends; clamp like the MaskGIT paper's plots


def _cosine(r: torch.Tensor) -> torch.Tensor:
    return torch.cos(r * math.pi / 2)


def _linear(r: torch.Tensor) -> torch.Tensor:
    return 1 - r


def _square(r: torch.Tensor) -> torch.Tensor:
    return 1 - r ** 2


def _cubic(r: torch.Tensor) -> torch.Tensor:
    return 1 - r ** 3


def _sqrt(r: torch.Tensor) -> torch.Tensor:
    return 1 - torch.sqrt(r)


def _log(r: torch.Tensor) -> torch.Tensor:
    # 1 - log-ish ramp: -log(r) normalized to [0,1] over [eps, 1]
    return (torch.log(r.clamp(min=_LOG_EPS)) / math.log(_LOG_EPS)).clamp(0, 1)


def _exp(r: torch.Tensor) -> torch.Tensor:
    return ((torch.exp(1 - r) - 1) / (math.e - 1)).clamp(0, 1)


GAMMAS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "cosine": _cosine, "linear": _linear, "square": _square,
    "cubic": _cubic, "sqrt": _sqrt, "log": _log, "exp": _exp,
}


def gamma_func(mode: str = "cosine") -> Callable[[torch.Tensor | float], torch.Tensor]:
    """Return the schedule called `mode`; accepts floats or tensors of ratios in [0,1]."""
    if mode not in GAMMAS:
        raise ValueError(f"unknown mask schedule {mode!r}; choose one of {', '.join(GAMMAS)}")
    fn = GAMMAS[mode]

    def gamma(r: torch.Tensor | float) -> torch.Tensor:
        r = torch.as_tensor(r, dtype=torch.float64).clamp(0.0, 1.0)
        # exact ends: cos(pi/2) is 6e-17 in floating point, and ceil(6e-17 * N) would leave one token masked
        out = fn(r).clamp(0.0, 1.0)
        return torch.where(r >= 1.0, torch.zeros_like(out), torch.where(r <= 0.0, torch.ones_like(out), out))

    return gamma
