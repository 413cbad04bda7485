"""Stage-2 training: the token cache, learning, exact resume, checkpoints, interrupts and errors (tiny CPU runs)."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import copy
import math

import numpy as np
import pytest
import torch
import yaml
from tiny_maskgit import REPO, make_tiny_setup, one_line_error, write_images

import training_transformer
from models.VQGAN import VQGAN, load_vqgan
from models.VQGAN_Transformer import MaskGit, load_maskgit_config
from training.token_cache import ensure_token_cache, load_token_cache
from sampler.latent_mask import latent_known_mask, pixel_known_of_tokens
from training.train_masks import BANK_SIZE, TrainingMasks, latent_holes
from training.transformer import VAL_MASK_SEED, TokenData
from utils.checkpoint import TRAINING_STATE_TAG, atomic_save, load_training_state, load_weights
from utils.data import ImageFolderDataset
from utils.masks import fixed_holes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_setup(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def shared_cache(tiny):
    """One token cache for the training runs, so that each run skips the VQGAN. Validation uses the training
    images: a memorisable task on which the loss must fall."""
    path = tiny.root / "tokens.pt"
    ensure_token_cache(load_vqgan(tiny.vq_config, tiny.vq_ckpt), tiny.vq_ckpt, tiny.train_dir, tiny.train_dir, path,
                       torch.device("cpu"), precision="fp32", verbose=False)
    return path


@pytest.fixture(scope="module")
def maskgit(tiny):
    return MaskGit(load_maskgit_config(tiny.maskgit_config))


@pytest.fixture(scope="module")
def mix_masks(maskgit):
    """--train-masks mix with every sample in a hole (the bank takes a few seconds: built once)."""
    return TrainingMasks(maskgit, "mix", 1.0, 0, torch.device("cpu"))


def with_prob(masks, p):
    other = copy.copy(masks)
    other.hole_prob = p
    return other


def draw(masks, target, seed):
    """(mask, the latent holes drawn for it) of one call under torch seed `seed`; its pixel_known is checked: the
    drawn hole's pixels for a hole sample, else the patches of the tokens left known."""
    drawn = []
    spy = copy.copy(masks)
    spy.holes = lambda b, device: drawn.append(masks.holes(b, device)) or drawn[-1]
    torch.manual_seed(seed)
    corrupted, mask, pixel_known = spy(target)
    assert torch.equal(corrupted, target.masked_fill(mask, 32))
    assert pixel_known.shape == (len(target), 1, 64, 64)
    uniform = pixel_known_of_tokens(~mask, 64)
    if drawn:
        in_hole = (pixel_known[:, 0] == ~drawn[0]).flatten(1).all(1)
        assert (in_hole | (pixel_known == uniform).flatten(1).all(1)).all()
        assert not (mask & latent_known_mask(pixel_known, 16)).any()  # a masked token never has all its pixels
    else:
        assert torch.equal(pixel_known, uniform)
    return mask, latent_holes(drawn[0], 16) if drawn else None


def is_box(holes):
    rows, cols = holes.view(-1, 16, 16).any(2), holes.view(-1, 16, 16).any(1)
    return holes.sum(1) == rows.sum(1) * cols.sum(1)


def run(tiny, out, *extra, cache):
    """training_transformer.main in this process with the shared cache; returns its exit code."""
    argv = ["--MaskGitConfig", str(tiny.maskgit_config), "--train_d_path", str(tiny.train_dir),
            "--val_d_path", str(tiny.train_dir), "--checkpoint-path", str(out), "--device", "cpu",
            "--num_workers", "0", "--batch-size", "4", "--warmup-steps", "2", "--learning-rate", "1e-3"]
    argv += ["--token-cache", str(cache)]
    return training_transformer.main(argv + [str(a) for a in extra])


def read_log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_token_cache_is_built_once_and_rebuilt_when_inputs_change(tiny, tmp_path):
    vqgan = load_vqgan(tiny.vq_config, tiny.vq_ckpt)
    train_dir = tmp_path / "train"
    write_images(train_dir, 3, seed=5)
    ckpt = tmp_path / "VQGAN.pt"
    ckpt.write_bytes(tiny.vq_ckpt.read_bytes())
    cache = tmp_path / "tokens.pt"

    def build(**kw):
        return ensure_token_cache(vqgan, ckpt, train_dir, tiny.val_dir, cache, torch.device("cpu"), verbose=False, **kw)

    assert build()
    mtime = cache.stat().st_mtime_ns
    assert not build() and cache.stat().st_mtime_ns == mtime  # reused, not rewritten

    tokens = load_token_cache(cache)
    ds = ImageFolderDataset(train_dir, split="train")
    x = torch.stack([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        fp32 = vqgan.encode(x)[1].view(3, -1)
        fp32_flip = vqgan.encode(x.flip(-1))[1].view(3, -1)
    assert tokens.train.dtype == torch.int16 and tokens.train.shape == (3, 256) and tokens.val.shape == (4, 256)
    agree = (tokens.train.long() == fp32).float().mean() if tokens.encoder_precision == "bf16" else None
    if agree is None:  # fp32 encoding must be exact
        assert torch.equal(tokens.train.long(), fp32) and torch.equal(tokens.train_flip.long(), fp32_flip)
    else:  # bf16 was chosen only because it agrees with fp32 on >= 99.9% of the first batch
        assert agree >= 0.999

    write_images(train_dir, 1, seed=99)  # one image changes
    assert build() and cache.stat().st_mtime_ns != mtime
    assert not build()
    vq = VQGAN(yaml.safe_load(tiny.vq_config.read_text())["model_param"])
    torch.save(vq.state_dict(), ckpt)  # other VQGAN weights
    assert build() and not build()
    assert build(precision="fp32")  # the requested precision is part of the key
    assert not torch.equal(load_token_cache(cache).train.long(), fp32)  # other weights, other tokens


def test_short_run_learns_and_writes_every_output(tiny, tmp_path, shared_cache):
    out = tmp_path / "run"
    assert run(tiny, out, "--epochs", 12, "--save-per-epoch", 4, "--learning-rate", 1e-2, "--ema-decay", 0.9,
               cache=shared_cache) == 0
    log = read_log(out / "log.csv")
    assert [int(r["epoch"]) for r in log] == list(range(1, 13))
    first, last = log[0], log[-1]
    # below the entropy of the token frequencies: the model uses the visible tokens, not only their statistics
    freq = torch.bincount(load_token_cache(shared_cache).train.long().flatten(), minlength=32).double()
    freq = freq[freq > 0] / freq.sum()
    assert float(last["val_loss"]) < -(freq * freq.log()).sum().item() - 0.08
    assert float(last["val_loss"]) < float(first["val_loss"]) - 0.3
    assert float(last["train_loss"]) < float(first["train_loss"]) - 0.3
    assert float(last["val_acc"]) > float(first["val_acc"]) + 0.04
    assert int(last["step"]) == 12 * 4 and float(last["lr"]) < 1e-6  # 16 sequences / batch 4; cosine to 0
    for name in ["transformer_epoch_4.pt", "transformer_epoch_12.pt", "transformer_last.pt", "transformer_raw_last.pt",
                 "MaskGit_tiny.yml"]:
        assert (out / name).is_file(), name
    assert not (out / "transformer_epoch_2.pt").exists()
    assert load_training_state(out / "training_state.pt")["format"] == TRAINING_STATE_TAG
    maskgit = MaskGit(load_maskgit_config(out / "MaskGit_tiny.yml"))
    maskgit.load_transformer_checkpoint(out / "transformer_last.pt")
    assert torch.equal(maskgit.transformer.bias, load_weights(out / "transformer_epoch_12.pt")["bias"])


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny, tmp_path, shared_cache):
    common = ["--epochs", 2, "--ckpt-interval", 1]
    assert run(tiny, tmp_path / "a", *common, cache=shared_cache) == 0
    assert run(tiny, tmp_path / "b", *common, "--max-steps", 3, cache=shared_cache) == 0  # stops mid-epoch 1
    assert load_training_state(tmp_path / "b" / "training_state.pt")["step"] == 3
    assert run(tiny, tmp_path / "b", *common, "--resume", cache=shared_cache) == 0
    for name in ["transformer_raw_last.pt", "transformer_last.pt"]:
        a, b = load_weights(tmp_path / "a" / name), load_weights(tmp_path / "b" / name)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    log_a, log_b = read_log(tmp_path / "a" / "log.csv"), read_log(tmp_path / "b" / "log.csv")
    assert [(r["epoch"], r["kind"]) for r in log_b] == [("0", "stop"), ("1", "epoch"), ("2", "epoch")]
    assert [(r["epoch"], r["train_loss"], r["val_loss"]) for r in log_a] == \
           [(r["epoch"], r["train_loss"], r["val_loss"]) for r in log_b if r["kind"] == "epoch"]
    steps_a, steps_b = read_log(tmp_path / "a" / "train_steps.csv"), read_log(tmp_path / "b" / "train_steps.csv")
    assert [int(r["step"]) for r in steps_b] == list(range(1, 9))
    assert [(r["train_loss"], r["lr"]) for r in steps_a] == [(r["train_loss"], r["lr"]) for r in steps_b]


def test_cache_only_checks_the_cache_and_trains_nothing(tiny, tmp_path, shared_cache):
    mtime = shared_cache.stat().st_mtime_ns
    assert run(tiny, tmp_path / "run", "--cache-only", cache=shared_cache) == 0
    assert shared_cache.stat().st_mtime_ns == mtime and not (tmp_path / "run" / "training_state.pt").exists()


def test_start_from_epoch_loads_the_lab_checkpoint(tiny, tmp_path, shared_cache):
    out = tmp_path / "run"
    assert run(tiny, out, "--epochs", 1, cache=shared_cache) == 0
    assert run(tiny, out, "--epochs", 2, "--start-from-epoch", 1, cache=shared_cache) == 0
    assert [int(r["epoch"]) for r in read_log(out / "log.csv")] == [1, 2]
    assert (out / "transformer_epoch_2.pt").is_file()


def test_a_start_from_epoch_run_resumes_exactly(tiny, tmp_path, shared_cache):
    for name in ("a", "b"):
        assert run(tiny, tmp_path / name, "--epochs", 1, cache=shared_cache) == 0
    common = ["--epochs", 3, "--start-from-epoch", 1, "--ckpt-interval", 1]
    assert run(tiny, tmp_path / "a", *common, cache=shared_cache) == 0
    assert run(tiny, tmp_path / "b", *common, "--max-steps", 3, cache=shared_cache) == 0
    (tmp_path / "b" / "transformer_epoch_1.pt").unlink()  # the saved state, not the epoch file, holds the weights
    assert run(tiny, tmp_path / "b", "--epochs", 3, "--ckpt-interval", 1, "--resume", cache=shared_cache) == 0
    a, b = load_weights(tmp_path / "a" / "transformer_raw_last.pt"), load_weights(tmp_path / "b" / "transformer_raw_last.pt")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    log = read_log(tmp_path / "b" / "log.csv")
    assert [(int(r["epoch"]), r["kind"]) for r in log] == [(1, "epoch"), (1, "stop"), (2, "epoch"), (3, "epoch")]


def test_non_finite_loss_stops_with_exit_1_and_keeps_the_last_good_state(tiny, tmp_path, shared_cache, capsys):
    out = tmp_path / "run"
    assert run(tiny, out, "--epochs", 3, "--learning-rate", 1e30, "--warmup-steps", 0, "--ckpt-interval", 1,
               cache=shared_cache) == 1
    err = capsys.readouterr().err
    assert "loss is" in err and "at step" in err
    state = load_training_state(out / "training_state.pt")
    assert state["step"] >= 1 and all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("case", ["missing_vqgan", "bad_config", "bad_flag", "bad_hole_prob", "resume_without_state",
                                  "no_images"])
def test_user_errors_exit_2_with_one_line(tiny, tmp_path, shared_cache, capsys, case):
    extra: list = ["--epochs", 1, "--batch-size", 4]
    cfg = yaml.safe_load(tiny.maskgit_config.read_text())
    if case == "missing_vqgan":
        cfg["model_param"]["VQ_Configs"]["VQ_CKPT_path"] = str(tmp_path / "missing.pt")
    elif case == "bad_config":
        del cfg["model_param"]["gamma_type"]
    elif case == "bad_flag":
        extra += ["--partial", 0]
    elif case == "bad_hole_prob":
        extra += ["--hole-mask-prob", 1.5]
    elif case == "resume_without_state":
        extra += ["--resume"]
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    train_dir = tmp_path / "empty" if case == "no_images" else tiny.train_dir
    train_dir.mkdir(exist_ok=True)
    code = training_transformer.main([
        "--MaskGitConfig", str(tmp_path / "c.yml"), "--train_d_path", str(train_dir), "--val_d_path",
        str(tiny.val_dir), "--checkpoint-path", str(tmp_path / "run"), "--device", "cpu", "--num_workers", "0",
        *map(str, extra)])
    err = capsys.readouterr().err.strip().splitlines()  # progress bars may come first
    assert code == 2
    assert err[-1].startswith("error: ") and sum("error" in ln for ln in err) == 1, err
    assert not any("Traceback" in ln for ln in err)
    expected = {"missing_vqgan": "training_vqgan.py", "bad_config": "gamma_type", "bad_flag": "--partial",
                "bad_hole_prob": "--hole-mask-prob", "resume_without_state": "training_state.pt",
                "no_images": "no .png images"}[case]
    assert expected in err[-1]


def test_sigint_saves_a_state_and_exits_130(tiny, tmp_path, shared_cache):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "training_transformer.py"), "--MaskGitConfig", str(tiny.maskgit_config),
         "--train_d_path", str(tiny.train_dir), "--val_d_path", str(tiny.train_dir), "--checkpoint-path", str(out),
         "--device", "cpu", "--num_workers", "0", "--batch-size", "4", "--epochs", "1000", "--ckpt-interval", "1",
         "--token-cache", str(shared_cache)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "training_state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "Traceback" not in err
    state = load_training_state(out / "training_state.pt")
    assert state["step"] >= 1
    assert run(tiny, out, "--epochs", state["epoch"] + 1, "--resume", cache=shared_cache) == 0


def test_uniform_train_masks_draw_exactly_what_mask_tokens_draws(maskgit, mix_masks):
    target = torch.randint(0, 32, (64, 256))
    uniform = TrainingMasks(maskgit, "uniform", 0.5, 0, torch.device("cpu"))
    torch.manual_seed(7)
    expected = [maskgit.mask_tokens(target) for _ in range(2)]
    torch.manual_seed(7)
    got = [uniform(target) for _ in range(2)]  # the same RNG use: the second batch agrees too
    assert all(torch.equal(a, b) for e, g in zip(expected, got) for a, b in zip(e, g))
    # mix with P=0: every sample takes the uniform rule's masks of the same seed
    assert torch.equal(draw(with_prob(mix_masks, 0.0), target, 7)[0], expected[0][1])
    # a hole that covers no token falls back to the uniform rule
    empty = copy.copy(mix_masks)
    empty.bank = torch.zeros_like(mix_masks.bank)
    assert torch.equal(draw(empty, target, 7)[0], expected[0][1])


def test_hole_samples_mask_part_of_their_hole_and_at_least_one_token(maskgit, mix_masks):
    target = torch.randint(0, 32, (256, 256))
    mask, holes = draw(mix_masks, target, 0)  # P=1: every sample in a hole
    size = holes.sum(1)
    assert (size > 0).all() and not (mask & ~holes).any() and (mask.sum(1) >= 1).all()
    share = mask.sum(1) / size
    assert (share == 1).sum() > 8 and (share < 0.5).sum() > 40  # the whole hole (step 0) and later steps
    # the holes are bank entries, flipped or transposed; stroke and box 50/50
    latent_bank = latent_holes(mix_masks.bank, 16)
    bank = latent_bank.view(-1, 16, 16)
    variants = torch.cat([b.flatten(1) for t in (bank, bank.transpose(1, 2))
                          for b in (t, t.flip(1), t.flip(2), t.flip(1).flip(2))])
    assert all((variants == h).all(1).any() for h in holes[:32])
    assert not all((latent_bank == h).all(1).any() for h in holes[:32])  # some are transformed
    assert 80 < is_box(holes).sum() < 176 and is_box(latent_bank).sum() == BANK_SIZE["box"]
    # P=0.5: about half the samples leave their hole
    mask, holes = draw(with_prob(mix_masks, 0.5), target, 0)
    assert 80 < (mask & ~holes).any(1).sum() < 176


def test_box_train_masks_draw_boxes_only(maskgit):
    masks = TrainingMasks(maskgit, "boxes", 0.5, 0, torch.device("cpu"))
    mask, holes = draw(masks, torch.randint(0, 32, (64, 256)), 1)
    assert is_box(holes).all() and not (mask & ~holes).any() and (mask.sum(1) >= 1).all()
    other_seed = TrainingMasks(maskgit, "boxes", 0.5, 1, torch.device("cpu"))
    assert torch.equal(masks.bank, TrainingMasks(maskgit, "boxes", 0.5, 0, torch.device("cpu")).bank)
    assert not torch.equal(masks.bank, other_seed.bank)


def test_val_hole_masks_are_the_fixed_val_holes_and_the_uniform_ones_unchanged(maskgit):
    val = torch.randint(0, 32, (5, 256), dtype=torch.int16)
    data = TokenData.for_validation(val, maskgit, torch.device("cpu"), holes=True)
    expected = latent_holes(np.concatenate([fixed_holes("stroke", 3), fixed_holes("box", 5)[3:]]), 16)
    assert torch.equal(data.val_hole_mask, expected) and expected.any(1).all()
    uniform = maskgit.mask_tokens(val.long(), torch.Generator().manual_seed(VAL_MASK_SEED))[1]
    assert torch.equal(data.val_mask, uniform)
    assert TokenData.for_validation(val, maskgit, torch.device("cpu")).val_hole_mask is None  # only when asked for


def test_mix_run_logs_the_hole_metrics(tiny, tmp_path, shared_cache, monkeypatch):
    monkeypatch.setitem(BANK_SIZE, "stroke", 16)  # a smaller bank: the seconds of drawing strokes add nothing here
    out = tmp_path / "run"
    assert run(tiny, out, "--epochs", 2, "--train-masks", "mix", "--hole-mask-prob", 0.7, cache=shared_cache) == 0
    log = read_log(out / "log.csv")
    assert list(log[0])[:7] == ["epoch", "step", "train_loss", "val_loss", "val_acc", "lr", "seconds"]
    assert [int(r["epoch"]) for r in log] == [1, 2]
    for row in log:
        assert math.isfinite(float(row["val_hole_loss"])) and 0 <= float(row["val_hole_acc"]) <= 1
        assert float(row["val_hole_loss"]) != float(row["val_loss"])
    args = load_training_state(out / "training_state.pt")["args"]
    assert (args["train_masks"], args["hole_mask_prob"]) == ("mix", 0.7)


def test_resume_refuses_other_train_masks_and_continues_a_state_saved_before_them(tiny, tmp_path, shared_cache,
                                                                                  capsys):
    out = tmp_path / "run"
    assert run(tiny, out, "--epochs", 2, "--max-steps", 5, cache=shared_cache) == 0  # epoch 1 logged, then 1 step
    state_path = out / "training_state.pt"
    state = load_training_state(state_path)
    for flag in ("train_masks", "hole_mask_prob"):  # as saved before the flags existed
        del state["args"][flag]
    atomic_save(state, state_path)
    lines = (out / "log.csv").read_text().splitlines()
    (out / "log.csv").write_text("\n".join(",".join(ln.split(",")[:7]) for ln in lines) + "\n")
    argv = ["--MaskGitConfig", str(tiny.maskgit_config), "--checkpoint-path", str(out), "--device", "cpu",
            "--batch-size", "4", "--epochs", "2", "--token-cache", str(shared_cache), "--resume"]
    err = one_line_error(training_transformer.main, argv + ["--train-masks", "mix"], capsys)
    assert "--train-masks was uniform in the saved run, now mix; pass the same value" in err
    err = one_line_error(training_transformer.main, argv + ["--hole-mask-prob", "0.3"], capsys)
    assert "--hole-mask-prob was 0.5 in the saved run, now 0.3" in err
    assert run(tiny, out, "--epochs", 2, "--resume", cache=shared_cache) == 0
    log = read_log(out / "log.csv")
    assert [(r["epoch"], r["kind"]) for r in log] == [("1", "nan"), ("1", "nan"), ("2", "epoch")]  # epoch, stop
    assert log[0]["val_hole_loss"] == "nan" and math.isfinite(float(log[-1]["val_hole_loss"]))
