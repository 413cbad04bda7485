"""What a training folder of training_transformer.py logged (log.csv, train_steps.csv, sittings.csv), read for the
plots and tables of long runs and studies (long_run.py, benchmarks/compare_runs.py)."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from utils.cli import UserError


@dataclass
class RunFolder:
    """The logs of one training folder: log.csv rows, per-step (step, loss, seconds x threads), sittings."""
    name: str
    log: list[dict[str, str]]
    steps: list[tuple[int, float, float]]
    sittings: list[dict[str, str]]

    @classmethod
    def read(cls, folder: Path) -> "RunFolder":
        def rows(name: str) -> list[dict[str, str]]:
            path = folder / name
            if not path.is_file():
                raise UserError(f"{path} not found; pass a folder written by training_transformer.py")
            with open(path, newline="") as f:
                return list(csv.DictReader(f))
        steps = [(int(r["step"]), float(r["train_loss"]), float(r["seconds"]) * int(r["threads"]))
                 for r in rows("train_steps.csv")]
        return cls(folder.name, rows("log.csv"), steps, rows("sittings.csv"))

    @staticmethod
    def read_steps(folder: Path) -> list[tuple[int, float]]:
        """(step, wall seconds) of every step in a folder's train_steps.csv (none before its first step)."""
        path = folder / "train_steps.csv"
        if not path.is_file():
            return []
        with open(path, newline="") as f:
            return [(int(r["step"]), float(r["seconds"])) for r in csv.DictReader(f)]

    def cpu_hours_at(self, offset: float = 0.0) -> dict[int, float]:
        """Cumulative CPU-hours at the end of each step, from `offset` at the first."""
        out, total = {}, offset
        for step, _, cpu_seconds in self.steps:
            total += cpu_seconds / 3600
            out[step] = total
        return out

    def validation_rows(self) -> list[dict[str, str]]:
        """The log.csv rows of validations at a step this folder trained (epoch ends, stops, a cooldown's end)."""
        trained = {step for step, _, _ in self.steps}
        return [r for r in self.log if r["step"] and int(r["step"]) in trained]

    def cooldown_end(self) -> dict[str, str] | None:
        """The log.csv row of a finished cooldown branch's last step (None if it is not one, or not finished)."""
        ends = [r for r in self.log if r.get("kind") == "cooldown"]
        return ends[-1] if ends else None
