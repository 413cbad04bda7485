"""benchmarks/train_throughput.py on the tiny setup: it times the trainer's own step, --breakdown accounts
for that step's time by op and bounds mfu_vs_matmul by the matmuls' share, and --shift-cost times the conditioned
step with flips and with cached shifts."""
import re

import pytest
import yaml

from benchmarks import train_throughput
from tiny_maskgit import exit_code, make_tiny_setup, one_line_error


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_setup(tmp_path_factory.mktemp("tiny"))


def test_breakdown_lists_the_ops_and_the_matmul_ceiling_bounds_the_measured_ratio(tiny, capsys):
    argv = ["--config", str(tiny.maskgit_config), "--batch-size", "4", "--iters", "2", "--warmup", "1", "--breakdown"]
    assert exit_code(train_throughput.main, argv) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^  (aten::\S+) +([\d.]+) s", out, re.M)
    assert len(listed) == train_throughput.TOP_OPS
    assert any(name in train_throughput.MATMUL_OPS for name, _ in listed)
    measured = float(re.search(r"^mfu_vs_matmul ([\d.]+)$", out, re.M).group(1))
    ceiling = float(re.search(r"would reach at most ([\d.]+)", out).group(1))
    assert 0 < measured <= ceiling  # the profiled matmuls are part of a step at least as long as they are


def test_shift_cost_times_the_conditioned_step_with_flips_then_with_cached_shifts(tiny, capsys):
    cfg = yaml.safe_load(tiny.maskgit_config.read_text())
    cfg["model_param"]["Transformer_param"]["pixel_conditioning"] = True
    config = tiny.root / "MaskGit_tiny_pixels.yml"
    config.write_text(yaml.safe_dump(cfg))
    argv = ["--config", str(config), "--batch-size", "4", "--iters", "3", "--warmup", "1", "--shift-cost",
            "--train-masks", "mix"]
    assert exit_code(train_throughput.main, argv) == 0
    out = capsys.readouterr().out
    flip = float(re.search(r"^step ([\d.]+) s", out, re.M).group(1))
    shift = float(re.search(r"^eager \+ AdamW default \+ augment shift: step ([\d.]+) s", out, re.M).group(1))
    assert flip > 0 and shift > 0
    assert re.search(r"^shift_cost [-+][\d.]+ ", out, re.M)


def test_a_step_count_below_one_is_one_line_and_exit_2(tiny, capsys):
    assert "--iters" in one_line_error(train_throughput.main, ["--config", str(tiny.maskgit_config), "--iters", "0"],
                                       capsys)
