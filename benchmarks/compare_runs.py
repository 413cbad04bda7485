"""Stage-2 runs side by side at equal wall time (the dropout and size studies, docs/RESULTS.md "Stage-2 studies"):
val loss and val_hole_loss against CPU-hours, each run's speed, and where its curve points.

    python benchmarks/compare_runs.py --runs ~/runs/study/ARM_A ~/runs/study/ARM_B \
        --cooldowns ~/runs/study/ARM_A_cd ~/runs/study/ARM_B_cd --extrapolate 6 --output docs/study_curves.png

A run is a folder written by training_transformer.py; --cooldowns (optional, in the same order) are branches
from each run's last state. The extrapolation fits val_loss = a + b ln(CPU-hours) to each run's validation points
after its first epoch and reads it at --extrapolate CPU-hours: a straight line in log-time is how these curves
look over the range measured, nothing more, so it says which run is pulling ahead, not what the loss will be.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.run_logs import RunFolder  # noqa: E402
from utils.cli import OneLineParser, UserError, run_cli  # noqa: E402


def validation_points(run: RunFolder) -> list[tuple[float, float, float]]:
    """(CPU-hours, val_loss, val_hole_loss) at each validation of the run."""
    hours = run.cpu_hours_at()
    return [(hours[int(r["step"])], float(r["val_loss"]), float(r["val_hole_loss"])) for r in run.validation_rows()]


def log_time_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares a, b of loss = a + b ln(hours)."""
    xs, ys = [math.log(h) for h, _ in points], [loss for _, loss in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def compare(args: argparse.Namespace) -> None:
    if args.cooldowns and len(args.cooldowns) != len(args.runs):
        raise UserError(f"--cooldowns: {len(args.cooldowns)} folders for {len(args.runs)} --runs; give one per run")
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    lines = [f"| run | steps | s/step | CPU-hours | val loss | val_hole_loss | fit b (per e-fold of time) | "
             f"fit at {args.extrapolate:g} CPU-h | cooldown val loss | cooldown val_hole_loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for i, folder in enumerate(args.runs):
        run = RunFolder.read(folder)
        points = validation_points(run)
        if not points:
            raise UserError(f"{folder}: no validation rows in log.csv; train for an epoch or stop it with a state")
        hours, val, hole = zip(*points)
        ax.plot(hours, val, "o-", ms=3, color=f"C{i}", label=f"{run.name} val_loss")
        ax.plot(hours, hole, "s--", ms=3, color=f"C{i}", label=f"{run.name} val_hole_loss")
        fit = "-", "-"
        if len(points) >= 3:  # the first point is left out: it is still in the warm-up's fast fall
            a, b = log_time_fit([(h, v) for h, v, _ in points[1:]])
            fit = f"{b:.3f}", f"{a + b * math.log(args.extrapolate):.3f}"
        seconds = sum(s for _, _, s in run.steps) / max(1, int(run.sittings[0]["threads"]))
        cooldown = "-", "-"
        if args.cooldowns:
            branch = RunFolder.read(args.cooldowns[i])
            end = branch.cooldown_end()
            if end is not None:
                cooldown = f"{float(end['val_loss']):.4f}", f"{float(end['val_hole_loss']):.4f}"
                end_hours = branch.cpu_hours_at(hours[-1])[int(end["step"])]
                ax.plot([end_hours], [float(end["val_loss"])], "*", ms=11, color=f"C{i}")
        lines.append(f"| {run.name} | {run.steps[-1][0]} | {seconds / len(run.steps):.3f} | {hours[-1]:.2f} | "
                     f"{val[-1]:.4f} | {hole[-1]:.4f} | {fit[0]} | {fit[1]} | {cooldown[0]} | {cooldown[1]} |")
    ax.set(title="stage 2 at equal wall time (EMA weights; * = end of a cooldown)", xlabel="CPU-hours",
           ylabel="val cross-entropy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.output)
    print(f"wrote {args.output}\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="training folders (training_transformer.py)")
    p.add_argument("--cooldowns", nargs="*", type=Path, default=[], help="a cooldown branch of each run, same order")
    p.add_argument("--extrapolate", type=float, default=6.0, help="CPU-hours at which to read each run's fit")
    p.add_argument("--output", default="study_curves.png")
    args = p.parse_args(argv)
    return run_cli(lambda: compare(args))


if __name__ == "__main__":
    sys.exit(main())
