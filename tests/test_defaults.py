"""A fresh clone's everyday commands need no flag: inpainting uses the shipped models and prints FID, stage-2
training trains the CPU-sized transformer on the shipped VQGAN's tokens, and the lab's structures are one flag away."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny_maskgit import REPO, brush_masks, write_images, write_masked_test_set

import experiments
import inpainting
import training_transformer
from models.VQGAN_Transformer import MaskGit, load_maskgit_config, transformer_ckpt_path
from training.transformer import TRAIN_DEFAULTS, train_defaults
from utils.checkpoint import load_training_state
from utils.config import ConfigError


def run_in(folder: Path, script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python REPO/script args` started in `folder`, as a user runs it beside their cat_face/."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FID_CACHE_DIR": ""}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_inference_defaults_are_the_shipped_models():
    for parse in (inpainting.parse_args, experiments.parse_args):
        cfg = load_maskgit_config(parse([]).MaskGitConfig)
        model = MaskGit(cfg)  # the VQGAN checkpoint is in the repository
        model.load_transformer_checkpoint(transformer_ckpt_path(cfg))  # and so is the transformer, strictly
        assert transformer_ckpt_path(cfg).resolve() == REPO / "pretrained" / "long_run" / "cooldown_4" / "transformer.pt"


def test_every_shipped_config_builds_its_models_from_the_repository():
    """Each MaskGit config whose VQGAN is shipped builds (VQGAN weights loaded strictly), e.g. the GAN-trained
    VQGAN_small_gan that stage 2 trains on next; the lab's configs need the lab's weights and are left out."""
    built = []
    for path in sorted((REPO / "configs").glob("MaskGit*.yml")):
        cfg = load_maskgit_config(path)
        if (REPO / cfg["VQ_Configs"]["VQ_CKPT_path"]).is_file():
            MaskGit(cfg)
            built.append(path.name)
    assert {"MaskGit_demo.yml", "MaskGit_small.yml", "MaskGit_small_gan.yml"} <= set(built)


def test_inpainting_with_no_flag_but_the_users_prints_fid(tmp_path):
    rng = np.random.default_rng(0)
    gt = np.kron(rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8), np.ones((1, 8, 8, 1), dtype=np.uint8))
    write_masked_test_set(tmp_path / "cat_face", gt, brush_masks(3, seed=1)[:, 0].numpy())
    run = run_in(tmp_path, "inpainting.py", "--mask-func", "cosine", "--total-iter", "8")
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.search(r"^FID:  \d+\.\d+", run.stdout, re.M), run.stdout
    assert sorted(p.name for p in (tmp_path / "test_results").iterdir()) == [f"image_{i:03d}.png" for i in range(3)]


def test_training_with_no_flag_trains_the_cpu_sized_transformer_on_the_shipped_tokens(tmp_path):
    write_images(tmp_path / "cat_face" / "train", 16, seed=0)  # 32 sequences with flips: one step of batch 32
    write_images(tmp_path / "cat_face" / "val", 2, seed=1)
    run = run_in(tmp_path, "training_transformer.py", "--max-steps", "1", "--num_workers", "0")
    assert run.returncode == 0, run.stderr[-2000:]
    state = load_training_state(tmp_path / "transformer_checkpoints" / "training_state.pt")
    recipe = yaml.safe_load((REPO / "configs" / "MaskGit_small_gan.yml").read_text())["train_param"]
    assert state["args"]["MaskGitConfig"] == "configs/MaskGit_small_gan.yml" and state["step"] == 1
    assert {k: state["args"][k] for k in recipe} == recipe
    assert state["config"]["VQ_Configs"]["VQ_CKPT_path"] == "pretrained/VQGAN_small_gan/VQGAN.pt"
    assert (tmp_path / "transformer_checkpoints" / "transformer_last.pt").is_file()


def test_flags_override_the_recipe_and_the_lab_structure_keeps_the_lab_recipe():
    args = training_transformer.parse_args(["--epochs", "3"])
    training_transformer.fill_defaults(args)
    assert (args.epochs, args.learning_rate, args.warmup_steps) == (3, 1e-3, 100)
    args = training_transformer.parse_args(["--MaskGitConfig", "configs/MaskGit.yml"])
    training_transformer.fill_defaults(args)
    assert {k: getattr(args, k) for k in TRAIN_DEFAULTS} == TRAIN_DEFAULTS
    assert load_maskgit_config(args.MaskGitConfig)["Transformer_param"]["dim"] == 768  # the lab's, one flag away


@pytest.mark.parametrize("section, message", [({"epoch": 3}, "train_param.epoch is not a setting"),
                                              ({"epochs": "3"}, "train_param.epochs is '3'"),
                                              ({"learning_rate": "1e-3"}, "must be a number")])
def test_a_bad_recipe_is_named(tmp_path, section, message):
    cfg = yaml.safe_load((REPO / "configs" / "MaskGit_small.yml").read_text())
    cfg["train_param"] = section
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=message):
        train_defaults(tmp_path / "c.yml")
