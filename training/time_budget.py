"""Training and inpainting on a wall-clock budget instead of a step count (the GPU campaign): the same command fits
any chip, and a slow phase cannot eat the next one's time."""
from __future__ import annotations

import time
from typing import Callable

from utils.train_utils import warmup_cosine


class Budget:
    """A phase's wall-clock allowance, started at construction; `stop` also ends it early (an interrupt)."""

    def __init__(self, minutes: float, stop: Callable[[], bool] = lambda: False) -> None:
        self.seconds, self.stop = 60.0 * minutes, stop
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over(self) -> bool:
        return self.elapsed() >= self.seconds or self.stop()


class BudgetSchedule:
    """LR multiplier for LambdaLR on a wall-clock budget: warm-up over `warmup_fraction` of the time, then cosine to
    0 at the budget's end. The clock starts after the first step, which torch.compile spends compiling: started
    with the budget, the warm-up would be over before the first weights moved."""

    def __init__(self, budget: Budget, warmup_fraction: float) -> None:
        self.budget, self.start = budget, 0.0
        self.schedule = warmup_cosine(round(1000 * warmup_fraction), 1000)  # in thousandths of the time

    def __call__(self, step: int) -> float:
        if step <= 1:  # LambdaLR asks before the first step (0) and after it (1)
            self.start = self.budget.elapsed()
        span = max(self.budget.seconds - self.start, 1e-9)
        return self.schedule(int(1000 * min(1.0, (self.budget.elapsed() - self.start) / span)))


class LossLog:
    """Mean losses over successive windows of a training phase (about `points` windows per budget), so that
    results.json holds a curve of a few dozen points whatever the number of steps. Each loss is averaged over the
    steps that report it (the GAN losses only exist once the GAN is on)."""

    def __init__(self, budget: Budget, points: int = 20) -> None:
        self.budget, self.window = budget, budget.seconds / points
        self.rows: list[dict[str, float]] = []
        self._sums: dict[str, list[float]] = {}
        self._next = self.window

    def add(self, step: int, losses: dict[str, float], **extra: float) -> None:
        for k, v in losses.items():
            total = self._sums.setdefault(k, [0.0, 0])
            total[0] += v
            total[1] += 1
        if self.budget.elapsed() >= self._next:
            self.flush(step, **extra)

    def flush(self, step: int, **extra: float) -> None:
        """Close the current window (also at the end of the phase, for the last partial one)."""
        if self._sums:
            self.rows.append({"step": step, "seconds": round(self.budget.elapsed(), 2), **extra,
                              **{k: total / n for k, (total, n) in self._sums.items()}})
        self._sums = {}
        self._next = self.budget.elapsed() + self.window
