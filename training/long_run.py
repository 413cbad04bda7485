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
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

import torch

from training.run_logs import RunFolder
from utils.checkpoint import atomic_save, atomic_write, half_state
from utils.cli import EXIT_INTERRUPTED
from utils.train_utils import atomic_write_text

# the trunk's recipe (docs/LONG_RUN.md): every sitting and cooldown trains with these flags
RECIPE = ["--schedule", "wsd", "--train-masks", "mix", "--hole-mask-prob", "0.5", "--ckpt-interval", "100",
          "--seed", "0"]
# the demo decoding of configs/MaskGit_demo.yml, at each of GUIDANCES: what a cooldown is compared by
DEMO_DECODING = ["--mask-funcs", "linear", "--total-iters", "8", "--decodings", "sample", "--temperatures", "1:0.1",
                 "--choice-temperatures", "4.5", "--seam-blends", "on", "--orderings", "confidence"]
GUIDANCES = ("10", "0")
# the decodings the ship test chooses among on all of val: the demo decoding with and without pixel guidance, and the
# lab's (cosine, argmax tokens, no guidance, no seam blend)
SHIP_DECODINGS = {
    "demo_g10": DEMO_DECODING + ["--pixel-guidances", "10"],
    "demo_g0": DEMO_DECODING + ["--pixel-guidances", "0"],
    "lab": ["--mask-funcs", "cosine", "--total-iters", "8", "--decodings", "argmax", "--choice-temperatures", "4.5",
            "--seam-blends", "off", "--orderings", "confidence", "--pixel-guidances", "0"],
}
HOLE_KINDS = ("boxes", "strokes")
VAL_SUBSET = 0.33  # the first third of val (258 of 781 images): the cooldowns' FID, the ship test takes all 781
LOGS = ("log.csv", "train_steps.csv", "sittings.csv")
VALIDATION_SHARE = 0.05  # an epoch's validation, next to its steps (439 steps of 0.86 s, validation ~17 s)
STARTUP_SECONDS = 60.0  # a training process's start, final validation and save, kept out of a cooldown's steps
# a cooldown's steps may run slower than the trunk's median: sitting 15's by 6 %, and it missed its budget by 40 of
# 1,877 steps; the VM's own speed varies by about 10 %
SPEED_MARGIN = 0.10
STOP_GRACE_SECONDS = 120.0  # how long a phase may take to save its state after its deadline's SIGTERM
GAP_GROWTH_FOR_AUGMENT = 0.01  # nats: a gap growing faster than this per sitting switches --augment shift on
PLATEAU_GAIN = 0.02  # val loss per CPU-hour between successive cooldowns below which the run has stopped paying
AROUND_RESUME = 200  # steps compared before and after each resume
FIT_DOUBLINGS = 2  # the trunk's val loss is fitted against log2(CPU-hours) over this many last doublings
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
        """experiments.py's output folder of `model` (a cooldown's name, or shipped_HASH) on `holes`."""
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
    """Wall seconds per optimizer step of the trunk after `since_step`: the median of its steps' own times (a
    stretch slowed by other work beside it does not count) plus VALIDATION_SHARE for the epochs' validations."""
    mine = [seconds for step, seconds in RunFolder.read_steps(trunk) if step > since_step]
    if not mine:
        raise ValueError(f"{trunk}: no step after {since_step} to time a cooldown by; train the trunk first")
    return (1.0 + VALIDATION_SHARE) * statistics.median(mine)


def cooldown_steps_for(minutes: float, step_seconds: float) -> int:
    """The cooldown that fits `minutes` at `step_seconds` per step, after a process's start and end, with
    SPEED_MARGIN to spare."""
    return max(1, int((60.0 * minutes - STARTUP_SECONDS) / (step_seconds * (1 + SPEED_MARGIN))))


class Phases:
    """Runs each phase as a child process with a deadline: at the deadline, or when this process gets SIGINT or
    SIGTERM, the child gets one SIGTERM (training saves a state that --resume continues, an FID study keeps the
    rows it measured). Children run in their own session, so a terminal's Ctrl-C reaches them only this way."""

    def __init__(self) -> None:
        self.interrupted = False
        self.child: subprocess.Popen | None = None
        self.stopped_at: float | None = None  # when the child got its SIGTERM (a second one would abort its save)

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
        """One SIGTERM per child: training takes a second one as "abort without saving"."""
        if self.child is not None and self.child.poll() is None and self.stopped_at is None:
            self.stopped_at = time.monotonic()
            self.child.send_signal(signal.SIGTERM)

    def run(self, command: list[str], deadline: float) -> tuple[int, bool]:
        """Run `command` until it ends; returns its exit code and whether the deadline (time.monotonic) stopped
        it. After the grace period past a SIGTERM the child is killed."""
        if self.interrupted:
            return EXIT_INTERRUPTED, False
        print("$ " + " ".join(command), flush=True)
        self.stopped_at = None
        self.child = subprocess.Popen(command, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            while self.child.poll() is None:
                now = time.monotonic()
                if now >= deadline or self.interrupted:
                    self._stop_child()
                if self.stopped_at is not None and now - self.stopped_at > STOP_GRACE_SECONDS:
                    self.child.kill()
                try:
                    self.child.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
            return self.child.returncode, self.stopped_at is not None and not self.interrupted
        finally:
            self.child = None


def write_fp16(weights: Path, target: Path) -> None:
    """The fp16 copy of a state_dict file: what a shipped transformer is committed as (half the bytes)."""
    atomic_save(half_state(torch.load(weights, map_location="cpu", weights_only=True)), target)


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


def cooldown_summary(trunk: RunFolder, folder: Path) -> dict[str, str] | None:
    """A finished cooldown branch's figures from its own logs, as cooldowns.csv holds them (None if unfinished):
    CPU-hours at its end are the trunk's up to the branch, then the branch's own (seconds x threads)."""
    branch = RunFolder.read(folder)
    end = branch.cooldown_end()
    if end is None or not branch.steps:
        return None
    start = branch.steps[0][0] - 1
    hours = branch.cpu_hours_at(trunk.cpu_hours_at().get(start, 0.0))[int(end["step"])]
    return {"cooldown": folder.name, "branch_step": str(start), "steps": str(int(end["step"]) - start),
            "cpu_hours": f"{hours:.4f}", "val_loss": f"{float(end['val_loss']):.4f}",
            "val_hole_loss": f"{float(end['val_hole_loss']):.4f}", "machine": branch.sittings[-1]["machine"]}


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


def chosen_decoding(fids: dict[str, dict[str, float]]) -> str:
    """The decoding (of SHIP_DECODINGS) with the lowest FID summed over the hole kinds: one config serves both."""
    return min(fids, key=lambda decoding: sum(fids[decoding][holes] for holes in HOLE_KINDS))


def ship_verdict(candidate: dict[str, dict[str, float]],
                 shipped: dict[str, dict[str, float]]) -> tuple[bool, list[str]]:
    """Whether the candidate, with its decoding chosen on val, beats the shipped transformer with its own on both
    hole types (FIDs by decoding, then hole kind), and a line per hole type."""
    mine, theirs = chosen_decoding(candidate), chosen_decoding(shipped)
    lines, beats = [], True
    for holes in HOLE_KINDS:
        beats &= candidate[mine][holes] < shipped[theirs][holes]
        lines.append(f"  {holes}: {candidate[mine][holes]:.2f} ({mine}) against the shipped transformer's "
                     f"{shipped[theirs][holes]:.2f} ({theirs})")
    return beats, lines


def ship_table(fids: dict[str, dict[str, dict[str, float]]]) -> str:
    """FID by transformer and decoding, each transformer's chosen decoding in bold."""
    lines = ["| transformer | decoding | " + " | ".join(f"FID val {h}" for h in HOLE_KINDS) + " | sum |",
             "| --- | --- | " + " | ".join("---:" for _ in HOLE_KINDS) + " | ---: |"]
    for model, by_decoding in fids.items():
        chosen = chosen_decoding(by_decoding)
        for decoding, by_holes in by_decoding.items():
            cells = [f"{by_holes[h]:.2f}" for h in HOLE_KINDS] + [f"{sum(by_holes.values()):.2f}"]
            if decoding == chosen:
                cells = [f"**{c}**" for c in cells]
            lines.append(f"| {model} | {decoding} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gap_advice(rows: list[dict[str, str]]) -> str | None:
    """--augment shift when the train/val gap grew by more than GAP_GROWTH_FOR_AUGMENT since the last cooldown."""
    gaps = [float(r["gap"]) for r in rows if r.get("gap")]
    if len(gaps) >= 2 and gaps[-1] - gaps[-2] > GAP_GROWTH_FOR_AUGMENT:
        return (f"the train/val gap grew by {gaps[-1] - gaps[-2]:.3f} nats since the last cooldown (more than "
                f"{GAP_GROWTH_FOR_AUGMENT}): continue with --augment shift")
    return None


def sitting_table(trunk: RunFolder) -> list[str]:
    """Each sitting (process start) of the trunk: its machine, steps, speed and CPU-hours."""
    lines = ["| sitting | machine | threads | precision | steps | steps/s | CPU-hours |",
             "| ---: | --- | ---: | --- | ---: | ---: | ---: |"]
    starts = [int(s["first_step"]) for s in trunk.sittings] + [10 ** 12]
    for i, s in enumerate(trunk.sittings):
        mine = [r for r in trunk.steps if starts[i] < r[0] <= starts[i + 1]]
        seconds = sum(r[2] for r in mine) / max(1, int(s["threads"]))
        rate = len(mine) / seconds if seconds else float("nan")
        lines.append(f"| {i + 1} | {s['machine']} | {s['threads']} | {s['precision']} | "
                     f"{mine[0][0] if mine else '-'}-{mine[-1][0] if mine else '-'} | {rate:.3f} | "
                     f"{sum(r[2] for r in mine) / 3600:.2f} |")
    return lines


def resume_table(trunk: RunFolder) -> list[str]:
    """The train loss just before and after each resume: a continuation must not jump."""
    losses = {step: loss for step, loss, _ in trunk.steps}
    lines = [f"| resumed after step | mean train loss, {AROUND_RESUME} steps before | the {AROUND_RESUME} after | "
             "change |", "| ---: | ---: | ---: | ---: |"]
    for s in trunk.sittings[1:]:
        first = int(s["first_step"])
        before = [losses[k] for k in range(first - AROUND_RESUME + 1, first + 1) if k in losses]
        after = [losses[k] for k in range(first + 1, first + AROUND_RESUME + 1) if k in losses]
        if before and after:
            b, a = sum(before) / len(before), sum(after) / len(after)
            lines.append(f"| {first} | {b:.4f} | {a:.4f} | {a - b:+.4f} |")
    return lines


def cooldown_table(cooldowns: list[dict[str, str]]) -> list[str]:
    """The cooldowns with the val loss each gained per CPU-hour since the one before (the plateau test)."""
    gains = gains_per_cpu_hour([(float(c["cpu_hours"]), float(c["val_loss"])) for c in cooldowns])
    lines = ["| cooldown | branch from step | steps | CPU-hours at its end | val loss | val_hole_loss | "
             "val loss gained per CPU-hour since the previous |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c, gain in zip(cooldowns, gains):
        lines.append(f"| {c['cooldown']} | {c['branch_step']} | {c['steps']} | {float(c['cpu_hours']):.2f} | "
                     f"{float(c['val_loss']):.4f} | {float(c['val_hole_loss']):.4f} | "
                     f"{'-' if gain is None else f'{gain:.4f}'} |")
    return lines


def gains_per_cpu_hour(points: list[tuple[float, float]]) -> list[float | None]:
    """For (CPU-hours, val loss) of successive cooldowns: the loss each gained per CPU-hour since the one before
    (None for the first, and where no CPU-time passed)."""
    return [None] + [(l0 - l1) / (h1 - h0) if h1 > h0 else None for (h0, l0), (h1, l1) in zip(points, points[1:])]


def loss_per_doubling(hours: list[float], losses: list[float]) -> tuple[float, float] | None:
    """Least-squares slope of loss against log2(hours) over the last FIT_DOUBLINGS doublings, and where they begin
    (None with fewer than two points there)."""
    since = hours[-1] / 2 ** FIT_DOUBLINGS if hours else 0.0
    fitted = [(math.log2(h), v) for h, v in zip(hours, losses) if h >= since]
    if len(fitted) < 2:
        return None
    return float(np.polyfit(*zip(*fitted), 1)[0]), since


def recipe_since(trunk: RunFolder) -> int:
    """The first step of the trailing sittings that trained the last one's recipe (config and augmentation): a
    change of model or data moves the loss curve, so the trunk's trend is fitted only after it. Sittings logged
    before sittings.csv had these columns count as one recipe."""
    def recipe(sitting: dict[str, str]) -> tuple[str, str]:
        return sitting.get("config") or "", sitting.get("augment") or ""
    recipes = [recipe(s) for s in trunk.sittings]
    first = len(recipes) - 1
    while first > 0 and recipes[first - 1] == recipes[-1]:
        first -= 1
    return int(trunk.sittings[first]["first_step"])


def run_tables(trunk: RunFolder, cooldowns: list[dict[str, str]]) -> str:
    """The sittings, the resumes, the cooldowns and the trunk's val loss per doubling of the CPU-hours its present
    recipe has trained."""
    hours = trunk.cpu_hours_at()
    since = recipe_since(trunk) if trunk.sittings else 0
    rows = [r for r in trunk.validation_rows() if int(r["step"]) > since]
    val_hours = [hours[int(r["step"])] - hours.get(since, 0.0) for r in rows]
    fit = loss_per_doubling(val_hours, [float(r["val_loss"]) for r in rows])
    return "\n".join(sitting_table(trunk) + [""] + resume_table(trunk) + [""] + cooldown_table(cooldowns)) + \
        f"\n\ntrunk val loss per doubling of its CPU-hours since step {since} (its present recipe): " + \
        ("fewer than two validations to fit" if fit is None else
         f"{fit[0]:+.4f} (fit from {fit[1]:.2f} to {val_hours[-1]:.2f} CPU-hours)")


def plot_run(trunk: RunFolder, cooldowns: list[dict[str, str]], output: Path) -> None:
    """val loss and val_hole_loss of the trunk (every validation at a step it trained) and of its cooldowns'
    ends against optimizer steps and CPU-hours, with a line where the present recipe began."""
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
    since = recipe_since(trunk) if trunk.sittings else 0
    if since in hours and since > int(trunk.sittings[0]["first_step"]):
        by_step.axvline(since, color="grey", ls=":", label="present recipe from here")
        by_hours.axvline(hours[since], color="grey", ls=":")
    by_step.set(title="stage 2, long run: val cross-entropy (EMA weights)", xlabel="optimizer step")
    by_hours.set(title="against compute", xlabel="CPU-hours (seconds x threads)")
    by_step.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(output, lambda f: fig.savefig(f, format="png"))
