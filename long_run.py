"""The long stage-2 run, one command per sitting: continue the trunk, branch a cooldown, evaluate it, report.

    python long_run.py sitting ~/runs/pixels --minutes 100 --cooldown-minutes 15
    python long_run.py ship ~/runs/pixels
    python long_run.py plot --trunk pretrained/long_run/trunk_pixels --table pretrained/long_run/trunk_pixels/cooldowns.csv

A sitting runs four phases, each in a process of its own with a budget (training_transformer.py, experiments.py,
benchmarks/generalization_gap.py: the commands of docs/LONG_RUN.md):
  1. trunk     continues the --schedule wsd trunk in RUN/trunk for --minutes: exactly from its last state, or, in a
               new folder (a fresh machine), from the committed compact state in --from; then writes the trunk's
               compact state and logs back into --from, the folder to commit.
  2. cooldown  branches RUN/cooldown_STEP from the trunk, sized to --cooldown-minutes by the step time just
               measured (the rate falls to 0 at its last step).
  3. evaluate  the cooldown's val loss and val_hole_loss (its log), the train/val gap, and FID on the first third of
               val (258 images) for box and stroke holes with the demo decoding at pixel guidance 10 and 0; the
               shipped transformer the same way, once per run folder.
  4. report    appends a row to --from/cooldowns.csv, redraws --figure, says whether the cooldown beats the
               shipped transformer and what to run next.
A cooldown that beats it on those images is a candidate; `ship` measures it against the shipped transformer on all of
val (781 images) with each decoding of SHIP_DECODINGS, chooses each one's decoding on val and says whether it ships.
The whole command ends within --minutes + --cooldown-minutes + --eval-minutes, plus at most 2 minutes per phase to
save after its deadline. Ctrl-C or SIGTERM in any phase saves what that phase has (training states, measured
rows) and exits 130; the next call with the same RUN continues that sitting where it stopped, and a call after a
finished sitting starts the next one. Exit codes as every script's (utils/cli.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

from training.augment import AUGMENTATIONS, DEFAULT_AUGMENT
from training.long_run import (DEMO_DECODING, GUIDANCES, HOLE_KINDS, LOGS, PLATEAU_GAIN, RECIPE, SHIP_DECODINGS,
                               VAL_SUBSET, Phases, RunLayout, append_cooldown, cooldown_steps_for, cooldown_summary,
                               copy_atomically, fid_rows, gains_per_cpu_hour, gap_advice, last_step, plot_run,
                               read_cooldowns, run_tables, seconds_per_step, ship_table, ship_verdict, verdict,
                               write_fp16)
from training.run_logs import RunFolder
from training.transformer import COMPACT_STATE_NAME
from utils.checkpoint import ensure_writable_dir, load_training_state
from utils.cli import EXIT_INTERRUPTED, OneLineParser, TrainingStopped, UserError, run_cli

REPO = Path(__file__).resolve().parent
PYTHON = sys.executable
TRUNK_MINUTES = 100.0  # a sitting's trunk budget: a three-hour machine keeps time for the cooldown and its evaluation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    measured = OneLineParser(add_help=False)  # what the sitting's evaluation and the ship test share
    measured.add_argument("--config", default="configs/studies/small_gan_pixels.yml", help="the trunk's MaskGit config")
    measured.add_argument("--shipped-config", default="configs/MaskGit_demo.yml",
                          help="the shipped pair's config, whose transformer a cooldown is compared with")
    measured.add_argument("--shipped-transformer", default=None, help="its transformer weights (default: the config's)")
    measured.add_argument("--val_d_path", default="./cat_face/val/")
    measured.add_argument("--fid-dims", type=int, choices=[64, 192, 768, 2048], default=2048,
                          help="Inception features")
    measured.add_argument("--debug", action="store_true", help="show tracebacks")
    s = sub.add_parser("sitting", parents=[measured], help="one sitting: trunk, cooldown, evaluation, report")
    s.add_argument("run", type=Path, help="the run folder on this machine (outside the repository, e.g. ~/runs/NAME)")
    s.add_argument("--minutes", type=float, default=TRUNK_MINUTES, help="the trunk's budget (0: branch from the "
                   "trunk as is)")
    s.add_argument("--cooldown-minutes", type=float, default=15.0, help="the cooldown's budget, which sizes it")
    s.add_argument("--eval-minutes", type=float, default=25.0,
                   help="the evaluation's budget (the first sitting of a run folder also measures the shipped "
                        "transformer: about twice the time)")
    s.add_argument("--from", dest="committed", type=Path, default=Path("pretrained/long_run/trunk_pixels"),
                   help="the committed folder: the trunk's compact state and logs, continued in a new run folder "
                        "and written back after the trunk phase; cooldowns.csv")
    s.add_argument("--figure", type=Path, default=Path("docs/long_run.png"), help="the run's curves, redrawn")
    s.add_argument("--augment", choices=list(AUGMENTATIONS), default=None,
                   help="the trunk's augmentation from this sitting on (default: as it was)")
    s.add_argument("--amp", choices=["auto", "bf16", "none"], default="auto", help="training precision")
    s.add_argument("--train_d_path", default="./cat_face/train/")
    s.add_argument("--batch-size", type=int, default=None, help="default: the config's recipe")
    s.add_argument("--trunk-steps", type=int, default=0, help="also stop the trunk after this many steps (0: time only)")
    s.add_argument("--cooldown-steps", type=int, default=0, help="a cooldown of this many steps (0: sized by time)")
    s.add_argument("--fid-partial", type=float, default=VAL_SUBSET, help="the share of val images scored")
    t = sub.add_parser("ship", parents=[measured],
                       help="the ship test: a candidate against the shipped transformer on all of val, each with the "
                            "decoding that suits it best")
    t.add_argument("run", type=Path, help="the run folder of the sitting whose cooldown is the candidate")
    t.add_argument("--candidate", type=Path, default=None,
                   help="its fp16 transformer (default: the last sitting's RUN/cooldown_STEP/transformer.pt)")
    t.add_argument("--fid-partial", type=float, default=1.0, help="the share of val images scored")
    g = sub.add_parser("plot", help="the curves and tables of a trunk and its cooldowns")
    g.add_argument("--trunk", required=True, type=Path, help="the trunk's folder (or the committed one: its logs)")
    g.add_argument("--cooldowns", nargs="*", type=Path, default=[], help="finished cooldown branch folders")
    g.add_argument("--table", type=Path, default=None, help="a cooldowns.csv of long_run.py sitting")
    g.add_argument("--output", type=Path, default=Path("docs/long_run.png"))
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if args.command != "sitting":
        return args
    for flag in ("minutes", "cooldown_minutes", "eval_minutes", "trunk_steps", "cooldown_steps"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must not be negative")
    if args.batch_size is not None and args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def training_command(args: argparse.Namespace, folder: Path, *extra: object) -> list[str]:
    command = [PYTHON, str(REPO / "training_transformer.py"), "--MaskGitConfig", args.config, "--checkpoint-path",
               str(folder), "--train_d_path", args.train_d_path, "--val_d_path", args.val_d_path, "--amp", args.amp,
               *RECIPE]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    return command + [str(e) for e in extra]


def check_phase(name: str, code: int, out_of_time: bool, phases: Phases) -> None:
    """A phase's exit code -> go on (0, or stopped by its deadline) or stop the sitting, as the phase did."""
    if phases.interrupted:
        raise TrainingStopped(f"interrupted in the {name} phase: what it had is saved; run the same command again "
                              f"to continue this sitting", EXIT_INTERRUPTED)
    if code != 0 and not out_of_time:
        raise TrainingStopped(f"the {name} phase failed (exit code {code}, its message above)", code)


def start_trunk(args: argparse.Namespace, layout: RunLayout) -> list[str]:
    """The flags that continue the trunk: its own state in the run folder, or the committed compact state (a new
    folder, or the committed trunk went further on another machine), whose logs it then appends to."""
    own = layout.trunk / "training_state.pt"
    if own.is_file() and last_step(layout.trunk) >= last_step(args.committed):
        return ["--resume-from", str(own)]
    compact = args.committed / COMPACT_STATE_NAME
    if not compact.is_file():
        raise UserError(f"--from {args.committed}: no {COMPACT_STATE_NAME} to continue; pass the committed folder of "
                        f"a --schedule wsd trunk (e.g. pretrained/long_run/trunk_pixels)")
    ensure_writable_dir(layout.trunk, "RUN")
    for name in LOGS:
        if (args.committed / name).is_file():
            copy_atomically(args.committed / name, layout.trunk / name)
    return ["--resume-from", str(compact)]


def trunk_state(args: argparse.Namespace, layout: RunLayout) -> Path:
    """The state a cooldown branches from: the trunk's own, or (--minutes 0 on a fresh machine) the committed one."""
    own = layout.trunk / "training_state.pt"
    return own if own.is_file() else args.committed / COMPACT_STATE_NAME


def trunk_phase(args: argparse.Namespace, layout: RunLayout, phases: Phases, deadline: float) -> dict:
    """Continue the trunk until its budget (with --augment, else the augmentation its state was trained with), write
    its compact state and logs into --from; returns the cooldown to branch."""
    resume = start_trunk(args, layout)
    state = load_training_state(resume[1])
    augment = args.augment or state["args"].get("augment", DEFAULT_AUGMENT)
    first = state["step"]
    del state
    minutes = (deadline - time.monotonic()) / 60.0 - 0.5
    if minutes > 0.1 or args.trunk_steps:
        extra = [*resume, "--max-minutes", f"{max(minutes, 0.1):.2f}", "--augment", augment]
        if args.trunk_steps:
            extra += ["--max-steps", first + args.trunk_steps]
        code, out_of_time = phases.run(training_command(args, layout.trunk, *extra), deadline)
        write_back_trunk(args, layout)
        check_phase("trunk", code, out_of_time, phases)
    branch = load_training_state(trunk_state(args, layout))["step"]  # a stop may log a step its state lacks
    if args.cooldown_steps:
        steps = args.cooldown_steps
    else:
        sittings = RunFolder.read(layout.trunk).sittings
        step_seconds = seconds_per_step(layout.trunk, int(sittings[-1]["first_step"]) if sittings else 0)
        steps = cooldown_steps_for(args.cooldown_minutes, step_seconds)
        print(f"trunk at step {branch}: {step_seconds:.3f} s per step -> a cooldown of {steps} steps", flush=True)
    return {"phase": "cooldown", "cooldown": f"cooldown_{branch}", "branch": branch, "steps": steps,
            "augment": augment}


def write_back_trunk(args: argparse.Namespace, layout: RunLayout) -> None:
    """The trunk's compact state and logs into the committed folder, each file replaced atomically."""
    for name in (COMPACT_STATE_NAME, *LOGS):
        if (layout.trunk / name).is_file():
            copy_atomically(layout.trunk / name, args.committed / name)
    step = load_training_state(args.committed / COMPACT_STATE_NAME)["step"]
    print(f"trunk state (step {step}) and logs written to {args.committed}: commit them", flush=True)


def cooldown_phase(args: argparse.Namespace, layout: RunLayout, phases: Phases, sitting: dict,
                   deadline: float) -> bool:
    """Train (or finish) the sitting's cooldown branch, with the trunk's augmentation; False if its budget ran out
    first (continued next call)."""
    folder = layout.root / sitting["cooldown"]
    if cooldown_finished(folder):
        return True
    resume = ["--resume"] if (folder / "training_state.pt").is_file() else \
        ["--resume-from", trunk_state(args, layout)]
    minutes = (deadline - time.monotonic()) / 60.0
    code, out_of_time = phases.run(training_command(
        args, folder, *resume, "--cooldown-steps", sitting["steps"], "--token-cache", layout.trunk / "token_cache.pt",
        "--augment", sitting.get("augment", DEFAULT_AUGMENT), "--max-minutes", f"{max(minutes, 0.1):.2f}"), deadline)
    check_phase("cooldown", code, out_of_time, phases)
    finished = cooldown_finished(folder)
    if not finished:
        print(f"the cooldown did not finish in --cooldown-minutes {args.cooldown_minutes:g}: its state is saved; run "
              f"the same command again to finish it", flush=True)
    return finished


def cooldown_finished(folder: Path) -> bool:
    return (folder / "sittings.csv").is_file() and RunFolder.read(folder).cooldown_end() is not None


def shipped_name(args: argparse.Namespace) -> str:
    """The folder of the shipped transformer's FIDs, named by what it is, so that a new shipped pair is measured."""
    key = Path(args.shipped_config).read_bytes() + str(args.shipped_transformer).encode()
    return "shipped_" + hashlib.sha1(key).hexdigest()[:8]


def shipped_flags(args: argparse.Namespace) -> list[str]:
    """experiments.py's flags that load the shipped pair."""
    return ["--MaskGitConfig", args.shipped_config] + (
        ["--load-transformer-ckpt-path", args.shipped_transformer] if args.shipped_transformer else [])


def weights_flags(args: argparse.Namespace, weights: Path) -> list[str]:
    """experiments.py's flags that load `weights` on the trunk's config."""
    return ["--MaskGitConfig", args.config, "--load-transformer-ckpt-path", str(weights)]


def fid_command(args: argparse.Namespace, loading: list[str], holes: str, decoding: list[str],
                output: Path) -> list[str]:
    """An experiments.py study on the first --fid-partial of val, resumed where it stopped."""
    return [PYTHON, str(REPO / "experiments.py"), "--split", "val", "--val_d_path", args.val_d_path, "--partial",
            str(args.fid_partial), "--figure-images", "0", "--references", *loading, "--holes", holes,
            "--output-dir", str(output), *decoding, "--dims", str(args.fid_dims), "--resume"]


def cooldown_fid_command(args: argparse.Namespace, layout: RunLayout, model: str, holes: str) -> list[str]:
    """The FID study of `model` (a cooldown of this run folder, or the shipped pair: shipped_HASH) with the demo
    decoding at each of GUIDANCES."""
    flags = shipped_flags(args) if model == shipped_name(args) else \
        weights_flags(args, layout.root / model / "transformer_last.pt")
    return fid_command(args, flags, holes, ["--pixel-guidances", *GUIDANCES, *DEMO_DECODING],
                       layout.fid_folder(model, holes))


def evaluate_phase(args: argparse.Namespace, layout: RunLayout, phases: Phases, sitting: dict,
                   deadline: float) -> bool:
    """Every measurement the report needs that is not measured yet; False if the budget ran out first."""
    name = sitting["cooldown"]
    folder = layout.root / name
    gap_file = folder / "gap.json"
    work = [cooldown_fid_command(args, layout, name, holes) for holes in HOLE_KINDS
            if len(fid_rows(layout.fid_folder(name, holes))) < len(GUIDANCES)]
    if not gap_file.is_file():
        work.append([PYTHON, str(REPO / "benchmarks" / "generalization_gap.py"), "--MaskGitConfig", args.config,
                     "--transformer", str(folder / "transformer_last.pt"), "--token-cache",
                     str(layout.trunk / "token_cache.pt"), "--train_d_path", args.train_d_path, "--val_d_path",
                     args.val_d_path, "--json", str(gap_file)])
    shipped = shipped_name(args)
    work += [cooldown_fid_command(args, layout, shipped, holes) for holes in HOLE_KINDS
             if len(fid_rows(layout.fid_folder(shipped, holes))) < len(GUIDANCES)]
    for command in work:
        code, out_of_time = phases.run(command, deadline)
        check_phase("evaluate", code, out_of_time, phases)
        if out_of_time:
            print(f"--eval-minutes {args.eval_minutes:g} spent before the evaluation ended: what it measured is "
                  f"kept; run the same command again to finish it", flush=True)
            return False
    return True


def report_phase(args: argparse.Namespace, layout: RunLayout, sitting: dict, argv: list[str]) -> None:
    """The cooldown's row in --from/cooldowns.csv, the redrawn figure, the verdict and the next command."""
    name = sitting["cooldown"]
    trunk = RunFolder.read(layout.trunk)
    gap = json.loads((layout.root / name / "gap.json").read_text())
    row = {**cooldown_summary(trunk, layout.root / name), "gap": f"{gap['uniform']['gap']:.4f}",
           "gap_holes": f"{gap['whole holes']['gap']:.4f}",
           "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())}
    for model, prefix in ((name, "fid"), (shipped_name(args), "shipped")):
        for holes in HOLE_KINDS:
            fids = fid_rows(layout.fid_folder(model, holes))
            row.update({f"{prefix}_{holes}_g{g}": f"{fids[g]:.2f}" for g in GUIDANCES})
    table = args.committed / "cooldowns.csv"
    append_cooldown(table, row)
    rows = read_cooldowns(table)
    plot_run(trunk, rows, args.figure)
    print("\n" + run_tables(trunk, rows))
    print(f"\n{name}: {row['steps']} steps from trunk step {row['branch_step']}, {row['cpu_hours']} CPU-hours: "
          f"val loss {row['val_loss']}, val_hole_loss {row['val_hole_loss']}, train/val gap {row['gap']} "
          f"(whole holes {row['gap_holes']}); row added to {table}, {args.figure} redrawn")
    beats, lines = verdict(row)
    print(f"FID on the first {args.fid_partial:g} of val, demo decoding:\n" + "\n".join(lines))
    if beats:
        fp16 = layout.root / name / "transformer.pt"
        write_fp16(layout.root / name / "transformer_last.pt", fp16)
        print(f"it beats the shipped transformer on both hole types: a candidate, {fp16} (fp16, as it would be "
              f"committed). Ship it only if it passes the ship test on all of val: python long_run.py ship "
              f"{shlex.quote(str(args.run))}")
    else:
        print("it does not beat the shipped transformer on both hole types yet: the trunk trains on")
    advice = gap_advice(rows)
    if advice:
        print(advice)
    gains = [g for g in gains_per_cpu_hour([(float(r["cpu_hours"]), float(r["val_loss"])) for r in rows]) if g]
    if len(gains) >= 2 and max(gains[-2:]) < PLATEAU_GAIN:
        print(f"plateau: the last two cooldowns gained {gains[-2]:.4f} and {gains[-1]:.4f} val loss per CPU-hour, "
              f"below {PLATEAU_GAIN}: more of the same compute buys little")
    print("next sitting: python long_run.py " + " ".join(shlex.quote(a) for a in next_sitting(argv, bool(advice))))


def next_sitting(argv: list[str], shift: bool = False) -> list[str]:
    """This sitting's command for the next one; a sitting that only branched (--minutes 0) gives the trunk its
    budget back, and with `shift` (the gap grew) the trunk switches to --augment shift."""
    argv = list(argv)
    if shift:
        argv = [a for a in argv if not a.startswith("--augment=")]
        if "--augment" in argv:
            del argv[argv.index("--augment"):argv.index("--augment") + 2]
        argv += ["--augment", "shift"]
    for i, arg in enumerate(argv):
        if arg == "--minutes" and i + 1 < len(argv) and float(argv[i + 1]) == 0:
            argv[i + 1] = f"{TRUNK_MINUTES:g}"
        elif arg.startswith("--minutes=") and float(arg.split("=", 1)[1]) == 0:
            argv[i] = f"--minutes={TRUNK_MINUTES:g}"
    return argv


def ship(args: argparse.Namespace) -> None:
    """The candidate and the shipped transformer on all of val, each decoding of SHIP_DECODINGS on each hole kind
    (the shipped one's once per run folder); the table, each one's decoding chosen on val, and the verdict."""
    layout = RunLayout(args.run)
    candidate = args.candidate
    if candidate is None:
        sitting = layout.read_sitting()
        if "cooldown" not in sitting:
            raise UserError(f"{args.run}: no sitting has branched a cooldown here; pass --candidate WEIGHTS.pt")
        candidate = layout.root / sitting["cooldown"] / "transformer.pt"
    if not candidate.is_file():
        raise UserError(f"--candidate {candidate}: no such file; a sitting's report writes it for a cooldown that "
                        f"beats the shipped transformer on its val subset, or pass --candidate WEIGHTS.pt")
    models = {candidate.parent.name: weights_flags(args, candidate), shipped_name(args): shipped_flags(args)}
    folder = {(model, decoding, holes): layout.root / "ship" / model / f"{decoding}_{holes}"
              for model in models for decoding in SHIP_DECODINGS for holes in HOLE_KINDS}
    with Phases() as phases:
        for (model, decoding, holes), output in folder.items():
            if not fid_rows(output):
                code, _ = phases.run(fid_command(args, models[model], holes, SHIP_DECODINGS[decoding], output),
                                     math.inf)
                check_phase("ship", code, False, phases)
    fids: dict[str, dict[str, dict[str, float]]] = {}
    for (model, decoding, holes), output in folder.items():
        fids.setdefault(model, {}).setdefault(decoding, {})[holes] = next(iter(fid_rows(output).values()))
    print(f"\nThe ship test: FID on {args.fid_partial:g} of val (lower is better); in bold the decoding chosen for "
          f"each transformer (lowest sum)\n\n" + ship_table(fids))
    ships, lines = ship_verdict(*fids.values())
    print("\n" + "\n".join(lines))
    if ships:
        print(f"{candidate.parent.name} ships: commit it as pretrained/long_run/cooldown_N/ (docs/LONG_RUN.md, \"Ship "
              f"it\"), point configs/MaskGit_demo.yml at it with its chosen decoding, and re-measure the README's "
              f"test table and headline")
    else:
        print(f"{candidate.parent.name} does not ship: the shipped transformer stays")


def plot(args: argparse.Namespace) -> None:
    trunk = RunFolder.read(args.trunk)
    cooldowns = read_cooldowns(args.table) if args.table else []
    for folder in args.cooldowns:
        summary = cooldown_summary(trunk, folder)
        if summary is None:
            print(f"note: {folder}: no finished cooldown, left out", file=sys.stderr)
        else:
            cooldowns.append(summary)
    plot_run(trunk, cooldowns, args.output)
    print(f"wrote {args.output}\n\n" + run_tables(trunk, cooldowns))


def run_sitting(args: argparse.Namespace, argv: list[str]) -> None:
    layout = RunLayout(args.run)
    ensure_writable_dir(args.run, "RUN")
    sitting = layout.read_sitting()
    started = time.monotonic()
    with Phases() as phases:
        if sitting["phase"] == "done":
            sitting = trunk_phase(args, layout, phases, started + 60.0 * args.minutes)
            layout.write_sitting(sitting)
        if sitting["phase"] == "cooldown":
            if not cooldown_phase(args, layout, phases, sitting, time.monotonic() + 60.0 * args.cooldown_minutes):
                return
            sitting = {**sitting, "phase": "evaluate"}
            layout.write_sitting(sitting)
        if not evaluate_phase(args, layout, phases, sitting, time.monotonic() + 60.0 * args.eval_minutes):
            return
    report_phase(args, layout, sitting, argv)
    layout.write_sitting({**sitting, "phase": "done"})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    commands = {"sitting": lambda: run_sitting(args, argv), "ship": lambda: ship(args), "plot": lambda: plot(args)}
    return run_cli(commands[args.command], debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
