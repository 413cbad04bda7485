"""Warmup-stable-decay: the trunk that continues from sitting to sitting and machine to machine, and its cooldown
branches (tiny CPU runs)."""
from __future__ import annotations

import csv
import math
import shutil

import pytest
import torch
from tiny_maskgit import make_tiny_setup_with_cache

import long_run
from benchmarks import compare_runs
import training_transformer
from training.long_run import gains_per_cpu_hour, loss_per_doubling
from training.transformer import COMPACT_STATE_NAME, compact_state, expand_compact_state
from utils.checkpoint import load_training_state, load_weights
from utils.train_utils import warmup_stable_decay

LR = 1e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_setup_with_cache(tmp_path_factory.mktemp("tiny"))


def run(tiny, out, *extra):
    argv = ["--MaskGitConfig", str(tiny.maskgit_config), "--train_d_path", str(tiny.train_dir),
            "--val_d_path", str(tiny.train_dir), "--checkpoint-path", str(out), "--device", "cpu",
            "--num_workers", "0", "--batch-size", "4", "--warmup-steps", "2", "--learning-rate", str(LR),
            "--token-cache", str(tiny.cache), "--cache-precision", "fp32", "--schedule", "wsd"]
    return training_transformer.main(argv + [str(a) for a in extra])


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def step_losses(folder):
    return {int(r["step"]): float(r["train_loss"]) for r in rows(folder / "train_steps.csv")}


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """A trunk of 16 steps (4 epochs of 4) in one go."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert run(tiny, out, "--max-steps", 16) == 0
    return out


@pytest.fixture(scope="module")
def first_sitting(tiny, tmp_path_factory):
    """The same trunk stopped after 6 steps (mid-epoch 2)."""
    out = tmp_path_factory.mktemp("first_sitting")
    assert run(tiny, out, "--max-steps", 6) == 0
    return out


def test_warmup_stable_decay_is_constant_after_the_warm_up_and_decays_to_zero():
    trunk = warmup_stable_decay(4)
    assert [trunk(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert all(trunk(s) == 1.0 for s in range(4, 10_000, 97))
    branch = warmup_stable_decay(4, cooldown_start=100, cooldown_steps=10)
    assert branch(99) == 1.0  # the trunk's rate up to the branch point
    decay = [branch(100 + k) for k in range(10)]  # the rates of the branch's steps 1..10 (LambdaLR's step - 1)
    assert decay == pytest.approx([1 - math.sqrt(k / 10) for k in range(1, 11)])
    assert decay[-1] == 0.0 and all(a > b for a, b in zip(decay, decay[1:]))


def test_a_trunk_resumed_within_a_sitting_is_exact(tiny, tmp_path, uninterrupted, first_sitting):
    out = tmp_path / "trunk"
    shutil.copytree(first_sitting, out)
    assert run(tiny, out, "--resume", "--max-steps", 16) == 0
    a, b = load_weights(uninterrupted / "transformer_raw_last.pt"), load_weights(out / "transformer_raw_last.pt")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert step_losses(out) == step_losses(uninterrupted)
    assert [r["kind"] for r in rows(out / "log.csv")] == ["epoch", "stop", "epoch", "epoch", "stop"]


def test_a_trunk_continued_on_another_machine_from_its_compact_state_has_no_jump(tiny, tmp_path, uninterrupted,
                                                                                    first_sitting):
    full, compact = first_sitting / "training_state.pt", first_sitting / COMPACT_STATE_NAME
    assert compact.stat().st_size < 0.5 * full.stat().st_size
    state = load_training_state(compact)
    assert state["compact"] and "ema" not in state and state["step"] == 6
    moments = list(state["optimizer"]["state"].values())
    assert all(m["exp_avg_sq_log8"].dtype == torch.uint8 and "exp_avg" not in m for m in moments)
    assert all(v.dtype == torch.float32 for v in state["model"].values())

    machine = tmp_path / "other_machine"  # nothing but the committed file
    machine.mkdir()
    shutil.copy(compact, machine / COMPACT_STATE_NAME)
    out = tmp_path / "trunk"
    assert run(tiny, out, "--resume-from", machine / COMPACT_STATE_NAME, "--max-steps", 16) == 0
    before, after = step_losses(uninterrupted), step_losses(out)
    assert sorted(after) == list(range(7, 17))
    gaps = [abs(after[s] - before[s]) for s in sorted(after)]
    assert gaps[0] < 1e-3, gaps  # the same weights, batch and masks at the seam: no jump
    # then a drift, not a jump: the first moments restart at zero, so the first updates are smaller (this tiny
    # model takes steps far larger than the long run's, where ~10 shrunken updates are lost in the noise)
    assert max(gaps) < 0.15 and all(b < a + 0.03 for a, b in zip(gaps, gaps[1:])), gaps
    scratch = step_losses(first_sitting)  # a restart from scratch would sit at the first steps' losses
    assert min(abs(after[7] - scratch[s]) for s in (1, 2)) > 2 * max(gaps), (gaps, scratch)


def test_compact_moments_keep_every_step_size_within_the_log_grid_and_zeros_exact():
    second = torch.cat([torch.zeros(3), torch.logspace(-30, -2, 997, base=2.0)]).reshape(10, 100)
    second = second[:, torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    state = {"step": 5, "model": {}, "optimizer": {"param_groups": [], "state": {
        0: {"step": torch.tensor(5.0), "exp_avg": torch.randn(10, 100), "exp_avg_sq": second}}}}
    back = expand_compact_state(compact_state(state))["optimizer"]["state"][0]
    assert back["exp_avg_sq"].shape == second.shape and torch.equal(back["exp_avg_sq"] == 0, second == 0)
    ratio = (back["exp_avg_sq"][second > 0] / second[second > 0]).sqrt()
    bound = 2 ** (28 / 1016) - 1  # a span of 28 binades
    assert (ratio - 1).abs().max() <= bound + 1e-6 and (ratio - 1).abs().max() > bound / 4
    assert not back["exp_avg"].any() and float(back["step"]) == 5.0


def test_a_cooldown_branch_reaches_rate_zero_at_its_last_step_and_leaves_the_trunk_alone(tiny, tmp_path,
                                                                                         uninterrupted, first_sitting):
    trunk = tmp_path / "trunk"
    shutil.copytree(first_sitting, trunk)
    before = (trunk / "training_state.pt").read_bytes()
    branch = tmp_path / "cooldown"
    assert run(tiny, branch, "--resume-from", trunk / "training_state.pt", "--cooldown-steps", 5) == 0
    steps = rows(branch / "train_steps.csv")
    assert [int(r["step"]) for r in steps] == [7, 8, 9, 10, 11]
    rates = [float(r["lr"]) for r in steps]
    assert rates == pytest.approx([LR * (1 - math.sqrt(k / 5)) for k in range(1, 6)], rel=1e-4)
    assert rates[-1] == 0.0
    log = rows(branch / "log.csv")
    assert [(r["kind"], r["step"]) for r in log] == [("epoch", "8"), ("cooldown", "11")]
    state = load_training_state(branch / "training_state.pt")
    assert state["cooldown_start"] == 6 and state["step"] == 11
    assert not (branch / COMPACT_STATE_NAME).exists()  # a branch is not a trunk to continue
    assert (branch / "transformer_last.pt").is_file()
    # the trunk's state is untouched, and the trunk continues as if no branch had been taken
    assert (trunk / "training_state.pt").read_bytes() == before
    assert run(tiny, trunk, "--resume", "--max-steps", 16) == 0
    assert step_losses(trunk) == step_losses(uninterrupted)


def test_max_minutes_stops_the_trunk_with_a_state_and_a_log_row(tiny, tmp_path):
    out = tmp_path / "trunk"
    assert run(tiny, out, "--max-minutes", 1e-6) == 0
    assert load_training_state(out / "training_state.pt")["step"] == 1
    assert [(r["kind"], r["step"]) for r in rows(out / "log.csv")] == [("stop", "1")]
    sittings = rows(out / "sittings.csv")
    assert len(sittings) == 1 and sittings[0]["first_step"] == "0" and sittings[0]["machine"]


@pytest.mark.parametrize("case", ["cooldown_without_wsd", "cooldown_without_trunk", "cooldown_into_trunk",
                                  "resume_a_branch_as_trunk", "resume_and_resume_from"])
def test_wsd_user_errors_exit_2_with_one_line(tiny, tmp_path, first_sitting, capsys, case):
    trunk_state = first_sitting / "training_state.pt"
    extra = {"cooldown_without_wsd": ["--schedule", "cosine", "--cooldown-steps", 3, "--resume-from", trunk_state],
             "cooldown_without_trunk": ["--cooldown-steps", 3],
             "cooldown_into_trunk": ["--cooldown-steps", 3, "--resume-from", trunk_state],
             "resume_a_branch_as_trunk": ["--resume"],
             "resume_and_resume_from": ["--resume", "--resume-from", trunk_state]}[case]
    out = first_sitting if case == "cooldown_into_trunk" else tmp_path / "out"
    if case == "resume_a_branch_as_trunk":
        assert run(tiny, out, "--resume-from", trunk_state, "--cooldown-steps", 2) == 0
    capsys.readouterr()
    assert run(tiny, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and not any("Traceback" in ln for ln in err), err
    expected = {"cooldown_without_wsd": "--schedule wsd", "cooldown_without_trunk": "--resume-from",
                "cooldown_into_trunk": "folder of its own", "resume_a_branch_as_trunk": "cooldown branch",
                "resume_and_resume_from": "pass one"}[case]
    assert expected in err[-1]


def test_long_run_plot_draws_the_trunk_and_its_cooldowns_and_tables_each_sitting(tiny, tmp_path, first_sitting,
                                                                                 capsys):
    trunk = tmp_path / "trunk"
    shutil.copytree(first_sitting, trunk)
    assert run(tiny, trunk, "--resume", "--max-steps", 12) == 0  # a second sitting
    assert run(tiny, tmp_path / "cooldown_12", "--resume-from", trunk / "training_state.pt", "--cooldown-steps", 2) == 0
    capsys.readouterr()
    out = tmp_path / "long_run.png"
    assert long_run.main(["plot", "--trunk", str(trunk), "--cooldowns", str(tmp_path / "cooldown_12"),
                          "--output", str(out)]) == 0
    assert out.stat().st_size > 10_000
    printed = capsys.readouterr().out
    sittings = [ln for ln in printed.splitlines() if ln.startswith("| 1 |") or ln.startswith("| 2 |")]
    assert len(sittings) == 2 and "| 1-6 |" in sittings[0] and "| 7-12 |" in sittings[1]
    assert "| 6 | " in printed  # the resume after step 6: losses before and after
    assert "| cooldown_12 | 12 | 2 |" in printed and printed.count(" | - |") == 1  # no cooldown before it
    assert "trunk val loss per doubling of its CPU-hours since step 0 (its present recipe): " in printed


def test_the_plateau_figures_are_gains_per_cpu_hour_and_the_slope_per_doubling():
    gains = gains_per_cpu_hour([(1.0, 6.0), (3.0, 5.9), (7.0, 5.88)])
    assert gains[0] is None and gains[1:] == pytest.approx([0.05, 0.005])
    assert gains_per_cpu_hour([(1.0, 6.0), (1.0, 5.9)]) == [None, None]  # no CPU-time between them: no rate
    hours = [0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0]
    losses = [6.5, 6.4, 6.0 - 0.03 * 1, 6.0 - 0.03 * math.log2(3), 6.0 - 0.03 * 2, 6.0 - 0.03 * math.log2(6), 5.91]
    slope, since = loss_per_doubling(hours, losses)  # the last two doublings: 2-8 CPU-hours
    assert since == 2.0 and slope == pytest.approx(-0.03)
    assert loss_per_doubling([8.0], [5.9]) is None


def test_compare_runs_tables_each_run_and_refuses_unpaired_cooldowns(tiny, tmp_path, uninterrupted, first_sitting,
                                                                   capsys):
    out = tmp_path / "curves.png"
    assert compare_runs.main(["--runs", str(uninterrupted), str(first_sitting), "--output", str(out)]) == 0
    assert out.stat().st_size > 10_000
    table = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"| {uninterrupted.name} |")
             or ln.startswith(f"| {first_sitting.name} |")]
    assert len(table) == 2 and "| 16 |" in table[0] and "| 6 |" in table[1]
    assert compare_runs.main(["--runs", str(uninterrupted), "--cooldowns", str(tmp_path), str(tmp_path),
                              "--output", str(out)]) == 2
    assert "one per run" in capsys.readouterr().err
