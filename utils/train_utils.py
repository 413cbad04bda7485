"""Helpers shared by the trainers: stopping on NaN, seeding, LR schedule, EMA, DDP, signals, logs.

Errors, exit codes and the device check live in utils.cli, precision decisions in utils.precision.
"""
from __future__ import annotations

import copy
import ctypes
import ctypes.util
import io
import math
import os
import random
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from utils.checkpoint import atomic_write
from utils.cli import EXIT_DIVERGED, USER_ERRORS, TrainingStopped, UserError, check_device


def diverged(what: str, step: int, checkpoint: Path) -> TrainingStopped:
    """The stop of a run whose loss or weights went NaN/inf at optimizer step `step` (1-based); nothing is saved
    after it, so `checkpoint` keeps the last good state."""
    kept = f"the last good checkpoint {checkpoint} is kept" if checkpoint.is_file() else "no checkpoint was written yet"
    return TrainingStopped(f"error: {what} at step {step}; stopped without saving ({kept}); lower --learning-rate, "
                           "or rerun with --detect-anomaly to find the operation", EXIT_DIVERGED)


def check_finite_weights(module: nn.Module, step: int, checkpoint: Path) -> None:
    """Before a save: a NaN/inf gradient can ruin the weights while the loss is still finite; never save those."""
    if not all(torch.isfinite(p).all() for p in module.parameters()):
        raise diverged("the weights became NaN/inf", step, checkpoint)


def keep_freed_memory() -> None:
    """Make glibc's malloc serve every allocation from its heap and keep freed memory there for reuse.

    By default glibc maps allocations above 32 MB (a CPU training step's attention probabilities, at batch 32 of
    the shipped shape) straight from the OS and unmaps them when freed, so every step page-faults them in again,
    zero-filled: 6-10 % of a CPU training step in this project's VM (benchmarks/train_throughput.py). The process
    then keeps its peak memory (the kernel may still reclaim idle pages). Does nothing without glibc (macOS, musl).
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2 ** 31 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier for LambdaLR: linear warm-up to 1 over `warmup_steps`, then cosine to 0 at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def warmup_stable_decay(warmup_steps: int, cooldown_start: int | None = None,
                        cooldown_steps: int = 0) -> Callable[[int], float]:
    """LR multiplier for LambdaLR, warmup-stable-decay (WSD): linear warm-up to 1, then constant (the trunk, which
    needs no end); a cooldown branch from step `cooldown_start` falls as 1 - sqrt(k / cooldown_steps) over its
    steps k = 1..cooldown_steps, so its last step runs at learning rate 0 (Hagele et al. 2024)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if cooldown_start is None or step < cooldown_start:
            return 1.0
        return 1.0 - math.sqrt(min(1.0, (step - cooldown_start + 1) / cooldown_steps))
    return factor


class EMA:
    """Exponential moving average of a model's weights; `module` is the averaged copy (eval mode, no grads).

    The effective decay ramps up as min(decay, (1+n)/(10+n)) so that short runs are not dominated by the
    random initialization. Buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_params = [p for p in self.module.parameters()]
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = state["num_updates"]


@dataclass
class DistEnv:
    """Where this process stands in a (possibly single-process) run."""
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def setup_distributed(device: str, timeout_minutes: int = 180) -> DistEnv:
    """Join the torchrun process group when launched by torchrun (RANK set), else a single process.

    nccl on CUDA (each rank takes cuda:LOCAL_RANK), gloo on CPU. The long timeout covers rank 0 doing slow
    one-off work (building a cache on a CPU) while the others wait.
    """
    dev = check_device(device)
    if "RANK" not in os.environ:
        if dev.type == "cuda":
            dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
            torch.cuda.set_device(dev)
        return DistEnv(0, 1, dev)
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=dev,
                                timeout=timedelta(minutes=timeout_minutes))
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(minutes=timeout_minutes))
    return DistEnv(rank, world_size, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def on_main_then_share(env: DistEnv, fn: Callable[[], Any]) -> None:
    """Run `fn` on rank 0 while the other ranks wait; a user error on rank 0 is raised on every rank.

    Used for one-off work whose result lands on disk (a cache), so that a failure never leaves ranks hanging.
    """
    error = None
    if env.is_main:
        try:
            fn()
        except USER_ERRORS as e:
            error = str(e)
    if env.distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UserError(error)


def all_reduce_sum(values: Sequence[float], env: DistEnv) -> list[float]:
    """Sum a few floats over ranks (one collective); identity in a single process."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's `obj` (plain data and tensors), in rank order.

    Objects travel as torch.save bytes: tensors pickled directly by dist.all_gather_object fail to unpickle
    in recent torch versions (UntypedStorage has no dtype).
    """
    if not env.distributed:
        return [obj]
    buf = io.BytesIO()
    torch.save(obj, buf)
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, buf.getvalue())
    # weights_only=False: the objects are our own ranks' (RNG states hold NumPy arrays, which weights_only refuses)
    return [torch.load(io.BytesIO(b), map_location="cpu", weights_only=False) for b in out]


class GracefulInterrupt:
    """Within the `with` block, the first SIGINT/SIGTERM only sets `requested` so the loop can save and stop
    at a step boundary; a second one raises KeyboardInterrupt at once."""

    def __init__(self, verbose: bool = True) -> None:
        self.requested = False
        self.verbose = verbose
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.verbose:
            print(f"\n{signal.Signals(signum).name} received: saving a training state after this step "
                  "(send it again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulInterrupt":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write a small text file (a log, a config copy) so that readers never see half of it."""
    atomic_write(path, lambda f: f.write(text.encode()))


class CSVLog:
    """A per-epoch CSV log rewritten atomically on every row; on resume, rows after the resumed epoch are dropped.
    A log written before columns were added at the end keeps its rows, with nan in the new columns."""

    def __init__(self, path: str | Path, fields: Sequence[str], keep_until_epoch: int | None = None) -> None:
        self.path = Path(path)
        self.fields = list(fields)
        self.lines = [",".join(self.fields)]
        if keep_until_epoch is not None and self.path.is_file():
            old = self.path.read_text().splitlines()
            old_fields = old[0].split(",") if old else []
            if old_fields and self.fields[:len(old_fields)] == old_fields:
                pad = ",nan" * (len(self.fields) - len(old_fields))
                self.lines += [ln + pad for ln in old[1:] if ln and int(ln.split(",")[0]) <= keep_until_epoch]

    def write(self, row: dict[str, Any]) -> None:
        def fmt(v: Any) -> str:
            return f"{v:.6g}" if isinstance(v, float) else str(v)
        self.lines.append(",".join(fmt(row[f]) for f in self.fields))
        atomic_write_text("\n".join(self.lines) + "\n", self.path)


class StepLog:
    """Every optimizer step as a CSV line (step, train_loss, lr it ran at, seconds it took, threads), appended and
    flushed as it happens: the record that shows a resume continues without a jump and how fast each sitting ran.
    On resume, lines after the resumed step (and a half-written last line) are dropped."""

    FIELDS = ["step", "train_loss", "lr", "seconds", "threads"]

    def __init__(self, path: str | Path, keep_until_step: int) -> None:
        self.path = Path(path)
        header = ",".join(self.FIELDS)
        kept = [header]
        if self.path.is_file():
            old = self.path.read_text().splitlines()
            if old and old[0] == header:
                kept += [ln for ln in old[1:] if ln.count(",") == len(self.FIELDS) - 1 and
                         ln.split(",")[0].isdigit() and int(ln.split(",")[0]) <= keep_until_step]
        atomic_write_text("\n".join(kept) + "\n", self.path)
        self.file = open(self.path, "a")

    def write(self, step: int, loss: float, lr: float, seconds: float) -> None:
        self.file.write(f"{step},{loss:.6g},{lr:.6g},{seconds:.4g},{torch.get_num_threads()}\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
