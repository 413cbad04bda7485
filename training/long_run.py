"""The long stage-2 run as sittings on machines that are taken away after a few hours (long_run.py sitting).

A run folder holds the trunk (`trunk/`, a --schedule wsd training folder), one folder per cooldown branch
(`cooldown_STEP/`, branched from the trunk at STEP), the shipped transformer's FIDs on the same val images
(`shipped/`, measured once per folder, i.e. per machine) and `sitting.json`, the phase a sitting has reached, so
that a sitting stopped in any phase is continued by the next call. What outlives the machine is the committed
folder: the trunk's compact state, its logs and `cooldowns.csv`, one row per evaluated cooldown.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from training.run_logs import RunFolder
from utils.checkpoint import atomic_write
from utils.train_utils import atomic_write_text

# the trunk's recipe (docs/LONG_RUN.md): every sitting and cooldown trains with these flags
RECIPE = ["--schedule", "wsd", "--train-masks", "mix", "--hole-mask-prob", "0.5", "--ckpt-interval", "100",
          "--seed", "0"]
# the demo decoding of configs/MaskGit_demo.yml, at each of GUIDANCES: what a cooldown is compared by
DEMO_DECODING = ["--mask-funcs", "linear", "--total-iters", "8", "--decodings", "sample", "--temperatures", "1:0.1",
                 "--choice-temperatures", "4.5", "--seam-blends", "on", "--orderings", "confidence"]
GUIDANCES = ("10", "0")
HOLE_KINDS = ("boxes", "strokes")
VAL_SUBSET = 0.33  # the first third of val (258 of 781 images): the cooldowns' FID, the ship test takes all 781
LOGS = ("log.csv", "train_steps.csv", "sittings.csv")
STARTUP_SECONDS = 60.0  # a training process's start, final validation and save, kept out of a cooldown's steps
STOP_GRACE_SECONDS = 120.0  # how long a phase may take to save its state after its deadline's SIGTERM
GAP_GROWTH_FOR_AUGMENT = 0.01  # nats: a gap growing faster than this per sitting switches --augment shift on
COOLDOWN_FIELDS = ["cooldown", "branch_step", "steps", "cpu_hours", "val_loss", "val_hole_loss", "gap",
                   "gap_holes"] + [f"fid_{h}_g{g}" for g in GUIDANCES for h in HOLE_KINDS] + \
                  [f"shipped_{h}_g{g}" for g in GUIDANCES for h in HOLE_KINDS] + ["machine", "finished_utc"]


@dataclass
class RunLayout:
    """Where a run folder keeps each part of the run."""
    root: Path

    @property
    def trunk(self) -> Path:
        return self.root / "trunk"

    @property
    def sitting_file(self) -> Path:
        return self.root / "sitting.json"

    def fid_folder(self, model: str, holes: str) -> Path:
        """experiments.py's output folder of `model` (a cooldown's name, or "shipped") on `holes`."""
        return self.root / model / f"fid_{holes}"

    def read_sitting(self) -> dict:
        """The phase the last sitting reached ({"phase": "done"} for a new folder)."""
        if not self.sitting_file.is_file():
            return {"phase": "done"}
        return json.loads(self.sitting_file.read_text())

    def write_sitting(self, sitting: dict) -> None:
        atomic_write_text(json.dumps(sitting, indent=1) + "\n", self.sitting_file)


def copy_atomically(source: Path, target: Path) -> None:
    """A copy that readers (and git) never see half-written."""
    with open(source, "rb") as f:
        atomic_write(target, lambda out: shutil.copyfileobj(f, out))


def last_step(folder: Path) -> int:
    """The last optimizer step a training folder logged (0 before any)."""
    steps = RunFolder.read_steps(folder)
    return steps[-1][0] if steps else 0


def seconds_per_step(trunk: Path, since_step: int) -> float:
    """Wall seconds per optimizer step of the trunk after `since_step`, validations included: from the epochs
    it finished there (log.csv), else from its steps' own times (train_steps.csv) plus 5 %."""
    run = RunFolder.read(trunk)
    epochs = [r for r in run.log if r["kind"] == "epoch" and int(r["step"]) > since_step]
    previous = {id(b): a for a, b in zip(run.log, run.log[1:])}
    per_step = [float(r["seconds"]) / (int(r["step"]) - int(previous[id(r)]["step"])) for r in epochs
                if id(r) in previous and previous[id(r)]["kind"] == "epoch"]
    if per_step:
        return statistics.median(per_step)
    mine = [seconds for step, seconds in RunFolder.read_steps(trunk) if step > since_step]
    if not mine:
        raise ValueError(f"{trunk}: no step after {since_step} to time a cooldown by; train the trunk first")
    return 1.05 * statistics.median(mine[-500:])


def cooldown_steps_for(minutes: float, step_seconds: float) -> int:
    """The cooldown that fits `minutes` at `step_seconds` per step, after a process's start and end."""
    return max(1, int((60.0 * minutes - STARTUP_SECONDS) / step_seconds))


class Phases:
    """Runs each phase as a child process with a deadline: at the deadline, or when this process gets SIGINT or
    SIGTERM, the child gets one SIGTERM (training saves a state that --resume continues, an FID study keeps the
    rows it measured). Children run in their own session, so a terminal's Ctrl-C reaches them only this way."""

    def __init__(self) -> None:
        self.interrupted = False
        self.child: subprocess.Popen | None = None

    def __enter__(self) -> "Phases":
        self._old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self.interrupted:
            print(f"\n{signal.Signals(signum).name} received: stopping the current phase (its state is kept)",
                  file=sys.stderr, flush=True)
        self.interrupted = True
        self._stop_child()

    def _stop_child(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def run(self, command: list[str], deadline: float) -> tuple[int, bool]:
        """Run `command` until it ends; returns its exit code and whether the deadline (time.monotonic) stopped
        it. After the grace period past a SIGTERM the child is killed."""
        if self.interrupted:
            return 130, False
        print("$ " + " ".join(command), flush=True)
        self.child = subprocess.Popen(command, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        stopped_at = None
        try:
            while self.child.poll() is None:
                now = time.monotonic()
                if stopped_at is None and (now >= deadline or self.interrupted):
                    self._stop_child()
                    stopped_at = now
                elif stopped_at is not None and now - stopped_at > STOP_GRACE_SECONDS:
                    self.child.kill()
                try:
                    self.child.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
            return self.child.returncode, stopped_at is not None and not self.interrupted
        finally:
            self.child = None


def fid_rows(folder: Path) -> dict[str, float]:
    """The FIDs an experiments.py folder measured, by pixel guidance ("10", "0")."""
    path = folder / "results.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {f"{float(r['pixel_guidance']):g}": float(r["fid"]) for r in csv.DictReader(f) if r["method"] == "maskgit"}


def read_cooldowns(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_cooldown(path: Path, row: dict[str, object]) -> None:
    """Add (or replace, by cooldown name) a row of the run's cooldown table."""
    rows = [r for r in read_cooldowns(path) if r["cooldown"] != row["cooldown"]] + [row]
    lines = [",".join(COOLDOWN_FIELDS)] + [",".join(str(r.get(k, "")) for k in COOLDOWN_FIELDS) for r in rows]
    atomic_write_text("\n".join(lines) + "\n", path)


def cooldown_hours(trunk: RunFolder, cooldown: RunFolder) -> float:
    """CPU-hours (seconds x threads) at a cooldown's end: the trunk's up to the branch, then the cooldown's own."""
    start = cooldown.steps[0][0] - 1
    return cooldown.cpu_hours_at(trunk.cpu_hours_at().get(start, 0.0))[cooldown.steps[-1][0]]


def verdict(row: dict[str, object]) -> tuple[bool, list[str]]:
    """Whether the cooldown beats the shipped transformer on both hole types (its better guidance against the
    shipped one's demo decoding, guidance 10), and a line per hole type."""
    lines, beats = [], True
    for holes in HOLE_KINDS:
        best = min(float(row[f"fid_{holes}_g{g}"]) for g in GUIDANCES)
        shipped = float(row[f"shipped_{holes}_g10"])
        beats &= best < shipped
        lines.append(f"  {holes}: {best:.2f} (best of guidance {', '.join(GUIDANCES)}) against the shipped "
                     f"transformer's {shipped:.2f}")
    return beats, lines


def gap_advice(rows: list[dict[str, str]]) -> str | None:
    """--augment shift when the train/val gap grew by more than GAP_GROWTH_FOR_AUGMENT since the last cooldown."""
    gaps = [float(r["gap"]) for r in rows if r.get("gap")]
    if len(gaps) >= 2 and gaps[-1] - gaps[-2] > GAP_GROWTH_FOR_AUGMENT:
        return (f"the train/val gap grew by {gaps[-1] - gaps[-2]:.3f} nats since the last cooldown (more than "
                f"{GAP_GROWTH_FOR_AUGMENT}): continue with --augment shift")
    return None


def plot_run(trunk: RunFolder, cooldowns: list[dict[str, str]], output: Path) -> None:
    """val loss and val_hole_loss of the trunk and its cooldowns against steps and CPU-hours."""
    from matplotlib.figure import Figure
    hours = trunk.cpu_hours_at()
    rows = trunk.validation_rows()
    fig = Figure(figsize=(12, 4), dpi=100)
    by_step, by_hours = fig.subplots(1, 2)
    for key, style, color in (("val_loss", "o-", "C0"), ("val_hole_loss", "s-", "C1")):
        steps = [int(r["step"]) for r in rows]
        values = [float(r[key]) for r in rows]
        by_step.plot(steps, values, style, ms=3, color=color, label=f"trunk {key}")
        by_hours.plot([hours[s] for s in steps], values, style, ms=3, color=color, label=f"trunk {key}")
        for i, c in enumerate(cooldowns):
            end, value = int(c["branch_step"]) + int(c["steps"]), float(c[key])
            label = f"cooldown {key}" if i == 0 else None
            marker, ccolor = ("*", "C3") if key == "val_loss" else ("P", "C2")
            by_step.plot([end], [value], marker, ms=11, color=ccolor, label=label)
            by_hours.plot([float(c["cpu_hours"])], [value], marker, ms=11, color=ccolor)
    by_step.set(title="stage 2, long run: val cross-entropy (EMA weights)", xlabel="optimizer step")
    by_hours.set(title="against compute", xlabel="CPU-hours (seconds x threads)")
    by_step.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(output, lambda f: fig.savefig(f, format="png"))
