"""long_run.py sitting on a tiny setup: a whole sitting from a committed trunk, a second one stopped by its
evaluation budget and continued by the next call, the trunk exact across them, and its one-line errors."""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_maskgit import REPO, make_tiny_setup, one_line_error, random_transformer_checkpoint

import long_run
import training.long_run
import training_transformer
from training.run_logs import RunFolder
from training.transformer import record_sitting
from utils.checkpoint import load_training_state, load_weights

TRUNK_STEPS, COOLDOWN_STEPS = 4, 2
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def train_flags(tiny, out: Path) -> list[str]:
    return ["--MaskGitConfig", str(tiny.maskgit_config), "--train_d_path", str(tiny.train_dir), "--val_d_path",
            str(tiny.val_dir), "--checkpoint-path", str(out), "--device", "cpu", "--num_workers", "0",
            "--batch-size", "4", "--cache-precision", "fp32", "--amp", "none", *long_run.RECIPE]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny setup, a committed trunk of 4 steps (compact state and logs, as in pretrained/long_run/) and a copy
    of that state to train an uninterrupted trunk from."""
    root = tmp_path_factory.mktemp("long_run")
    setup = make_tiny_setup(root, n_train=8, n_val=6)
    assert training_transformer.main(train_flags(setup, root / "seed") + ["--max-steps", str(TRUNK_STEPS)]) == 0
    setup.committed = root / "committed"
    setup.committed.mkdir()
    for name in ("trunk_state.pt", *long_run.LOGS):
        shutil.copy(root / "seed" / name, setup.committed / name)
    setup.start_state = root / "seed" / "trunk_state.pt"
    setup.shipped = random_transformer_checkpoint(root)
    return setup


def sitting(tiny, run: Path, *extra: str) -> int:
    argv = ["sitting", str(run), "--from", str(tiny.committed), "--config", str(tiny.maskgit_config),
            "--shipped-config", str(tiny.maskgit_config), "--shipped-transformer", str(tiny.shipped),
            "--figure", str(run.parent / "long_run.png"), "--train_d_path", str(tiny.train_dir), "--val_d_path",
            str(tiny.val_dir), "--batch-size", "4", "--amp", "none", "--trunk-steps", str(TRUNK_STEPS),
            "--cooldown-steps", str(COOLDOWN_STEPS), "--fid-dims", "64", "--fid-partial", "1", *extra]
    return long_run.main(argv)


@pytest.fixture(scope="module")
def two_sittings(tiny, tmp_path_factory):
    """Sitting 1 whole; sitting 2 stopped by an evaluation budget of 0, then finished by the same call again."""
    run = tmp_path_factory.mktemp("runs") / "pixels"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # the phases' processes, as the uninterrupted trunk below
        assert sitting(tiny, run) == 0
        first = {"table": rows(tiny.committed / "cooldowns.csv"), "sittings": rows(tiny.committed / "sittings.csv")}
        assert sitting(tiny, run, "--eval-minutes", "0") == 0
        stopped = {"phase": json.loads((run / "sitting.json").read_text())["phase"],
                   "table": rows(tiny.committed / "cooldowns.csv")}
        assert sitting(tiny, run) == 0
    return run, first, stopped


def test_a_sitting_trains_the_trunk_branches_a_cooldown_evaluates_and_reports_it(tiny, two_sittings):
    run, first, _ = two_sittings
    row = first["table"][0]
    assert row["cooldown"] == "cooldown_8" and row["branch_step"] == "8" and row["steps"] == str(COOLDOWN_STEPS)
    for key in ("val_loss", "val_hole_loss", "gap", "gap_holes", "fid_boxes_g10", "fid_strokes_g0",
                "shipped_boxes_g10", "shipped_strokes_g0"):
        assert float(row[key]) == float(row[key]) and float(row[key]) != 0.0, key  # measured, finite
    assert float(row["cpu_hours"]) >= 0.0
    log = rows(run / "cooldown_8" / "log.csv")
    assert log[-1]["kind"] == "cooldown"
    assert float(log[-1]["val_loss"]) == pytest.approx(float(row["val_loss"]), abs=1e-4)
    assert len(first["sittings"]) == 2  # the seed run's and this sitting's trunk process
    beats, _ = training.long_run.verdict(row)
    fp16 = run / "cooldown_8" / "transformer.pt"  # a candidate's weights as they would be committed
    assert fp16.is_file() == beats
    if beats:
        assert all(v.dtype == torch.float16 for v in load_weights(fp16).values() if v.is_floating_point())
    assert (run.parent / "long_run.png").stat().st_size > 10_000


def test_a_stopped_sitting_is_finished_by_the_next_call_without_more_training(tiny, two_sittings):
    run, first, stopped = two_sittings
    assert stopped["phase"] == "evaluate" and len(stopped["table"]) == 1
    table = rows(tiny.committed / "cooldowns.csv")
    assert [r["cooldown"] for r in table] == ["cooldown_8", "cooldown_12"]
    assert table[1]["shipped_boxes_g10"] == table[0]["shipped_boxes_g10"]  # measured once per run folder
    assert json.loads((run / "sitting.json").read_text())["phase"] == "done"
    steps = rows(tiny.committed / "train_steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 13))  # 4 committed + two sittings of 4, no more


def test_the_trunk_across_sittings_equals_one_uninterrupted_trunk(tiny, two_sittings, tmp_path):
    run, _, _ = two_sittings
    flags = train_flags(tiny, tmp_path / "uninterrupted") + ["--resume-from", str(tiny.start_state),
                                                             "--max-steps", str(3 * TRUNK_STEPS)]
    subprocess.run([sys.executable, str(REPO / "training_transformer.py"), *flags], check=True, env=ONE_THREAD,
                   capture_output=True)
    ours = load_weights(run / "trunk" / "transformer_raw_last.pt")
    theirs = load_weights(tmp_path / "uninterrupted" / "transformer_raw_last.pt")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    committed = torch.load(tiny.committed / "trunk_state.pt", weights_only=False)
    assert committed["step"] == 3 * TRUNK_STEPS


def test_sitting_errors_are_one_line(tiny, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = one_line_error(long_run.main, ["sitting", str(tmp_path / "run"), "--from", str(empty),
                                         "--config", str(tiny.maskgit_config)], capsys)
    assert "no trunk_state.pt" in err
    err = one_line_error(long_run.main, ["sitting", str(tmp_path / "run"), "--minutes", "-1"], capsys)
    assert "--minutes must not be negative" in err
    err = one_line_error(long_run.main, ["ship", str(tmp_path / "run")], capsys)
    assert "no sitting has branched a cooldown here" in err


def test_a_cooldown_is_sized_by_the_median_step_so_a_slowed_stretch_does_not_shrink_it(tmp_path):
    trunk = tmp_path / "trunk"
    trunk.mkdir()
    seconds = [9.0] * 50 + [0.5] * 100 + [2.0] * 40  # an earlier sitting, this one's steps, a stretch slowed by tests
    (trunk / "train_steps.csv").write_text("step,train_loss,lr,seconds,threads\n" + "".join(
        f"{step},5.0,0.001,{s},2\n" for step, s in enumerate(seconds, start=1)))
    step_seconds = training.long_run.seconds_per_step(trunk, since_step=50)
    assert step_seconds == pytest.approx(0.5 * (1 + training.long_run.VALIDATION_SHARE))
    steps = training.long_run.cooldown_steps_for(10.0, step_seconds)
    slower = step_seconds * 1.10  # the VM's speed varies by about 10 %: the cooldown must still end in its budget
    assert training.long_run.STARTUP_SECONDS + steps * slower <= 600 < training.long_run.STARTUP_SECONDS + \
        (steps + 1) * slower


def test_the_ship_test_measures_both_transformers_on_all_of_val_once_and_chooses_their_decodings(
        tiny, two_sittings, capsys, monkeypatch):
    run, _, _ = two_sittings
    decodings = {k: training.long_run.SHIP_DECODINGS[k] for k in ("demo_g0", "lab")}
    monkeypatch.setattr(long_run, "SHIP_DECODINGS", decodings)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["ship", str(run), "--candidate", str(run / "cooldown_12" / "transformer_last.pt"), "--config",
            str(tiny.maskgit_config), "--shipped-config", str(tiny.maskgit_config), "--shipped-transformer",
            str(tiny.shipped), "--val_d_path", str(tiny.val_dir), "--fid-dims", "64"]
    assert long_run.main(argv) == 0
    out = capsys.readouterr().out
    fids = {}
    for model in ("cooldown_12", long_run.shipped_name(long_run.parse_args(argv))):
        for decoding in decodings:
            for holes in training.long_run.HOLE_KINDS:
                measured = rows(run / "ship" / model / f"{decoding}_{holes}" / "results.csv")
                assert len(measured) == 1 and measured[0]["images"] == "6"  # all of val
                fids.setdefault(model, {}).setdefault(decoding, {})[holes] = float(measured[0]["fid"])
    ships, lines = training.long_run.ship_verdict(*fids.values())
    assert all(line in out for line in lines)
    assert ("cooldown_12 ships" in out) == ships and ("does not ship" in out) != ships

    def no_measuring(*args):
        raise AssertionError("measured again")
    monkeypatch.setattr(long_run.Phases, "run", no_measuring)
    assert long_run.main(argv) == 0  # everything is measured: the table again, from the folders


def test_the_ship_verdict_compares_each_transformer_at_its_own_decoding_on_both_hole_kinds():
    shipped = {"demo_g10": {"boxes": 10.0, "strokes": 15.0}, "lab": {"boxes": 12.0, "strokes": 12.5}}
    assert training.long_run.chosen_decoding(shipped) == "lab"  # 24.5 against 25.0: one decoding serves both
    better_on_both = {"demo_g10": {"boxes": 11.0, "strokes": 12.0}, "lab": {"boxes": 20.0, "strokes": 20.0}}
    assert training.long_run.ship_verdict(better_on_both, shipped)[0]  # 11.0 < 12.0 and 12.0 < 12.5
    worse_on_strokes = {"demo_g10": {"boxes": 9.0, "strokes": 13.0}, "lab": {"boxes": 20.0, "strokes": 20.0}}
    beats, lines = training.long_run.ship_verdict(worse_on_strokes, shipped)
    assert not beats and lines[1] == "  strokes: 13.00 (demo_g10) against the shipped transformer's 12.50 (lab)"


def test_the_next_sitting_gets_a_trunk_budget_back_after_a_branch_only_call_and_shifts_when_the_gap_grew():
    assert long_run.next_sitting(["sitting", "R", "--minutes", "0", "--cooldown-minutes", "33"]) == \
        ["sitting", "R", "--minutes", "100", "--cooldown-minutes", "33"]
    assert long_run.next_sitting(["sitting", "R", "--minutes=0"]) == ["sitting", "R", "--minutes=100"]
    assert long_run.next_sitting(["sitting", "R", "--minutes", "80"]) == ["sitting", "R", "--minutes", "80"]
    assert long_run.next_sitting(["sitting", "R", "--augment", "flip"], shift=True) == \
        ["sitting", "R", "--augment", "shift"]


def test_a_trunk_switched_to_shift_stays_on_it_and_its_cooldowns_train_with_it(tiny, two_sittings, tmp_path):
    run, committed = tmp_path / "pixels", tmp_path / "committed"
    shutil.copytree(two_sittings[0], run)
    shutil.copytree(tiny.committed, committed)
    tiny_from = copy.copy(tiny)
    tiny_from.committed = committed
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        assert sitting(tiny_from, run, "--augment", "shift") == 0
        assert sitting(tiny_from, run) == 0  # no --augment: as the trunk was
    for folder in ("trunk", "cooldown_16", "cooldown_20"):
        assert load_training_state(run / folder / "training_state.pt")["args"]["augment"] == "shift", folder
    assert (run / "trunk" / "shifted_tokens.pt").is_file()  # beside the token cache, which the cooldowns share


SAVING_CHILD = """
import signal, sys, time
terms = []
signal.signal(signal.SIGTERM, lambda *_: terms.append(time.time()))
started = time.time()
while not terms and time.time() - started < 30:
    time.sleep(0.05)
time.sleep(2.5)  # saving its state, as training does after the step in progress; a second SIGTERM would abort it
open(sys.argv[1], "w").write(str(len(terms)))
sys.exit(130)
"""


@pytest.mark.parametrize("stop", ["ctrl-c", "deadline"])
def test_a_phase_is_stopped_with_one_sigterm_so_that_it_saves(stop, tmp_path, monkeypatch):
    """Training takes a second SIGTERM as "abort without saving": Ctrl-C and the deadline each send exactly one."""
    sent, send = [], subprocess.Popen.send_signal
    monkeypatch.setattr(subprocess.Popen, "send_signal", lambda child, sig: (sent.append(sig), send(child, sig)))
    count = tmp_path / "terms"
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    with training.long_run.Phases() as phases:
        if stop == "ctrl-c":
            timer.start()
        deadline = float("inf") if stop == "ctrl-c" else time.monotonic() + 1.0
        code, out_of_time = phases.run([sys.executable, "-c", SAVING_CHILD, str(count)], deadline)
    assert sent == [signal.SIGTERM] and count.read_text() == "1" and code == 130
    assert (phases.interrupted, out_of_time) == ((True, False) if stop == "ctrl-c" else (False, True))


def test_the_trunk_trend_is_fitted_only_over_its_present_recipe():
    """Two sittings logged before sittings.csv named the recipe, then two of a new config from step 200: val loss
    falls 1.0 per doubling of CPU-hours before the switch and 0.1 per doubling of the new recipe's own CPU-hours
    after it. Only the present recipe's validations may count, against its own hours."""
    old = {"machine": "m", "threads": "1", "precision": "fp32"}
    new = {**old, "config": "pixels.yml", "augment": "flip"}
    sittings = [{**old, "first_step": "0"}, {**old, "first_step": "100", "config": "", "augment": ""},
                {**new, "first_step": "200"}, {**new, "first_step": "300"}]
    steps = [(k, 5.0, 36.0) for k in range(1, 401)]  # 0.01 CPU-hours a step

    def val_loss(step: int) -> float:
        return 10.0 - math.log2(step / 100) if step <= 200 else 3.0 - 0.1 * math.log2((step - 200) / 100)
    log = [{"step": str(k), "val_loss": str(val_loss(k)), "kind": "epoch"} for k in range(50, 401, 50)]
    trunk = RunFolder("trunk", log, steps, sittings)
    assert training.long_run.recipe_since(trunk) == 200
    assert "trunk val loss per doubling of its CPU-hours since step 200 (its present recipe): -0.1000 (fit from " \
           "0.50 to 2.00 CPU-hours)" in training.long_run.run_tables(trunk, [])
    assert training.long_run.recipe_since(RunFolder("trunk", log, steps, sittings[:2])) == 0


def test_a_sittings_file_from_before_the_recipe_columns_gains_them(tmp_path):
    path = tmp_path / "sittings.csv"
    path.write_text("started_utc,first_step,machine,threads,precision,processes\n2026-12-03T08:26:14,0,m,1,bf16,1\n")
    env = SimpleNamespace(device=torch.device("cpu"), world_size=1)
    args = argparse.Namespace(amp="none", MaskGitConfig="configs/studies/small_gan_pixels.yml", augment="shift")
    record_sitting(path, 27688, env, args)
    old, new = rows(path)
    assert old["first_step"] == "0" and old["config"] == "" and old["augment"] == ""
    assert new["first_step"] == "27688" and new["precision"] == "fp32"
    assert (new["config"], new["augment"]) == ("small_gan_pixels.yml", "shift")
