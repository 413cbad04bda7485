"""The long stage-2 run (--schedule wsd) across its sittings: val loss and val_hole_loss of the trunk and of its
cooldown branches against optimizer steps and CPU-hours (docs/long_run.png), and three tables in Markdown: each
sitting's machine and speed, the train loss around each resume (a continuation must not jump), the cooldowns with
the val loss each gained per CPU-hour since the one before (the run stops at a plateau: below 0.02). Last, the
trunk's val loss per doubling of its CPU-hours, a straight-line fit against log2(CPU-hours) over the last two
doublings: what the next sitting of the same length buys, roughly.

    python plot_long_run.py --trunk runs/long_run/trunk --cooldowns runs/long_run/cooldown_* \
        --output docs/long_run.png

A folder is one written by training_transformer.py (log.csv, train_steps.csv, sittings.csv); CPU-hours are the
seconds of every step times the threads it ran on, a cooldown's counted on from its branch point.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from training.run_logs import RunFolder
from utils.cli import OneLineParser, run_cli

AROUND_RESUME = 200  # steps compared before and after each resume
FIT_DOUBLINGS = 2  # the trunk's val loss is fitted against log2(CPU-hours) over this many last doublings


def sitting_table(trunk: RunFolder) -> list[str]:
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


def cooldown_table(cooldowns: list[tuple[str, int, int, float, dict[str, str]]]) -> list[str]:
    gains = gains_per_cpu_hour([(hours, float(end["val_loss"])) for _, _, _, hours, end in cooldowns])
    lines = ["| cooldown | branch from step | steps | CPU-hours at its end | val loss | val_hole_loss | "
             "val loss gained per CPU-hour since the previous |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (name, start, steps, hours, end), gain in zip(cooldowns, gains):
        lines.append(f"| {name} | {start} | {steps} | {hours:.2f} | {float(end['val_loss']):.4f} | "
                     f"{float(end['val_hole_loss']):.4f} | {'-' if gain is None else f'{gain:.4f}'} |")
    return lines


def gains_per_cpu_hour(points: list[tuple[float, float]]) -> list[float | None]:
    """For (CPU-hours, val loss) of successive cooldowns: the loss each gained per CPU-hour since the one before."""
    return [None] + [(l0 - l1) / (h1 - h0) for (h0, l0), (h1, l1) in zip(points, points[1:])]


def loss_per_doubling(hours: list[float], losses: list[float]) -> tuple[float, float] | None:
    """Least-squares slope of loss against log2(hours) over the last FIT_DOUBLINGS doublings, and where they begin
    (None with fewer than two points there)."""
    since = hours[-1] / 2 ** FIT_DOUBLINGS if hours else 0.0
    fitted = [(math.log2(h), v) for h, v in zip(hours, losses) if h >= since]
    if len(fitted) < 2:
        return None
    return float(np.polyfit(*zip(*fitted), 1)[0]), since


def plot(args: argparse.Namespace) -> None:
    trunk = RunFolder.read(args.trunk)
    trunk_hours = trunk.cpu_hours_at()
    fig = Figure(figsize=(12, 4), dpi=100)
    by_step, by_hours = fig.subplots(1, 2)
    cooldowns = []  # (name, branch step, steps, CPU-hours at the end, log.csv row of the end)
    trunk_rows = trunk.validation_rows()
    for key, style in (("val_loss", "o-"), ("val_hole_loss", "s-")):
        steps = [int(r["step"]) for r in trunk_rows]
        values = [float(r[key]) for r in trunk_rows]
        by_step.plot(steps, values, style, ms=3, label=f"trunk {key}")
        by_hours.plot([trunk_hours[s] for s in steps], values, style, ms=3, label=f"trunk {key}")
    for folder in args.cooldowns:
        branch = RunFolder.read(folder)
        end = branch.cooldown_end()
        if end is None or not branch.steps:
            print(f"note: {folder}: no finished cooldown, left out", file=sys.stderr)
            continue
        start = branch.steps[0][0] - 1
        hours = branch.cpu_hours_at(trunk_hours.get(start, 0.0))
        for key, marker in (("val_loss", "*"), ("val_hole_loss", "P")):
            for ax, x in ((by_step, int(end["step"])), (by_hours, hours[int(end["step"])])):
                ax.plot([x], [float(end[key])], marker, ms=11, color="C3" if key == "val_loss" else "C2",
                        label=f"cooldown {key}" if folder == args.cooldowns[0] else None)
        cooldowns.append((folder.name, start, int(end["step"]) - start, hours[int(end["step"])], end))
    by_step.set(title="stage 2, long run: val cross-entropy (EMA weights)", xlabel="optimizer step")
    by_hours.set(title="against compute", xlabel="CPU-hours (seconds x threads)")
    by_step.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output)
    print(f"wrote {args.output}\n")
    print("\n".join(sitting_table(trunk) + [""] + resume_table(trunk) + [""] + cooldown_table(cooldowns)))
    val_hours = [trunk_hours[int(r["step"])] for r in trunk_rows]
    fit = loss_per_doubling(val_hours, [float(r["val_loss"]) for r in trunk_rows])
    print("\ntrunk val loss per doubling of CPU-hours: " + ("fewer than two validations to fit" if fit is None else
          f"{fit[0]:+.4f} (fit from {fit[1]:.2f} to {val_hours[-1]:.2f} CPU-hours)"))


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trunk", required=True, type=Path, help="the trunk's folder")
    p.add_argument("--cooldowns", nargs="*", type=Path, default=[], help="cooldown branch folders")
    p.add_argument("--output", default="docs/long_run.png")
    args = p.parse_args(argv)
    return run_cli(lambda: plot(args))


if __name__ == "__main__":
    sys.exit(main())
