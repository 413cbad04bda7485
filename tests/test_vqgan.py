"""Stage 1: the lab layout, the codebook's maths, and a short training run that learns and resumes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from models.VQGAN import VQGAN, load_vqgan
from models.VQGAN.codebook import Codebook
from utils.checkpoint import CheckpointError, load_training_state, load_weights
from utils.image import save_png

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "fixtures" / "vqgan_state_dict.tsv"  # the lab's VQGAN.pt layout, key by key

TINY = dict(image_channels=3, enc_channels=[8, 16], dec_channels=[8, 16], latent_dim=8, img_resolution=64,
            latent_resolution=32, num_codebook_vectors=32, beta=0.25, norm_groups=4, enc_res_blocks=1,
            dec_res_blocks=1)


def lab_config() -> dict:
    return yaml.safe_load((ROOT / "configs" / "VQGAN.yml").read_text())["model_param"]


def test_lab_state_dict_layout_matches_reference_exactly():
    rows = [line.rstrip("\n").split("\t") for line in REFERENCE.read_text().splitlines()[1:]]
    with torch.device("meta"):
        sd = VQGAN(lab_config()).state_dict()
    ours = [(k, ",".join(map(str, v.shape))) for k, v in sd.items()]
    assert ours == [tuple(r) for r in rows]
    assert len(ours) == 315
    assert sum(v.numel() for v in sd.values()) == 70_775_299


def test_narrower_channels_give_the_same_network_and_small_config_is_cpu_sized():
    narrow = dict(lab_config(), enc_channels=[32, 32, 32, 64, 64, 128], dec_channels=[32, 32, 64, 64, 128],
                  latent_dim=64)
    small = yaml.safe_load((ROOT / "configs" / "VQGAN_small.yml").read_text())["model_param"]
    with torch.device("meta"):
        lab_sd = VQGAN(lab_config()).state_dict()
        narrow_sd = VQGAN(narrow).state_dict()
        small_model = VQGAN(small)
    assert list(narrow_sd) == list(lab_sd)
    assert narrow_sd["codebook.embedding.weight"].shape == (1024, 64)
    assert [name for name, _ in small_model.named_children()] == ["encoder", "decoder", "codebook", "quant_conv",
                                                                   "post_quant_conv"]
    assert sum(p.numel() for p in small_model.parameters()) < 2_000_000


def test_channel_rule_mismatch_is_reported():
    bad = dict(TINY, enc_channels=[8, 8, 8])
    with pytest.raises(ValueError, match="downsample"):
        VQGAN(bad)


def test_codebook_picks_nearest_code_and_passes_gradient_straight_through():
    torch.manual_seed(0)
    cb = Codebook(dict(num_codebook_vectors=8, latent_dim=4, beta=0.25))
    cb.embedding.weight.data = torch.randn(8, 4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, idx, loss = cb(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    brute = torch.cdist(flat, cb.embedding.weight.detach()).argmin(1)
    assert torch.equal(idx, brute)
    assert torch.allclose(z_q.permute(0, 2, 3, 1).reshape(-1, 4), cb.embedding.weight[idx], atol=1e-6)
    # straight-through: d(sum z_q)/dz is the identity
    (g,) = torch.autograd.grad(z_q.sum(), z, retain_graph=True)
    assert torch.allclose(g, torch.ones_like(g))
    # loss = mean((sg[zq]-z)^2) + beta * mean((zq - sg[z])^2), both terms have the same value
    mse = ((cb.embedding.weight[idx] - flat) ** 2).mean()
    assert torch.allclose(loss, 1.25 * mse, atol=1e-6)
    # the codebook term moves codes, the commitment term moves the encoder output
    (g_code,) = torch.autograd.grad(loss, cb.embedding.weight, retain_graph=True)
    (g_z,) = torch.autograd.grad(loss, z)
    assert g_code.abs().sum() > 0 and g_z.abs().sum() > 0


def test_encode_decode_indices_roundtrip_shapes_and_order():
    torch.manual_seed(0)
    m = VQGAN(dict(TINY, latent_resolution=16, enc_channels=[8, 16, 32], dec_channels=[8, 16, 32])).eval()
    x = torch.randn(3, 3, 64, 64)
    z_q, idx, _ = m.encode(x)
    assert z_q.shape == (3, 8, 16, 16) and idx.shape == (3 * 256,)
    # b,h,w order: the grid of image 1 is the 2nd block of 256 and decode_indices inverts the lookup
    assert torch.allclose(m.decode_indices(idx.view(3, 256)), m.decode(z_q), atol=1e-5)
    assert torch.equal(m.encode(x[1:2])[1], idx[256:512])


def test_dead_codes_are_restarted_on_encoder_outputs():
    cb = Codebook(dict(num_codebook_vectors=4, latent_dim=2, beta=0.25))
    z = torch.tensor([[5.0, 5.0], [6.0, 6.0]])
    dead = torch.tensor([True, False, True, False])
    before = cb.embedding.weight.detach().clone()
    assert cb.restart_dead_codes(z, dead, torch.Generator().manual_seed(0)) == 2
    w = cb.embedding.weight.detach()
    assert torch.equal(w[~dead], before[~dead])
    assert (w[dead] > 4.9).all()


def _tiny_dataset(root: Path, n_train: int = 8, n_val: int = 4) -> None:
    rng = np.random.default_rng(0)
    for split, n in [("train", n_train), ("val", n_val)]:
        (root / split).mkdir(parents=True)
        for i in range(n):
            img = np.zeros((64, 64, 3), np.uint8)
            img[:] = rng.integers(0, 255, 3)
            img[16:48, 16:48] = rng.integers(0, 255, 3)
            save_png(img, root / split / f"image_{i:05d}.png")


def _train(tmp: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    cfg = {"model_param": TINY, "train_param": {"batch_size": 4, "learning_rate": 1e-3, "disc_start": 6,
                                                "disc_base_channels": 8, "dead_code_window": 4}}
    (tmp / "tiny.yml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, str(ROOT / "training_vqgan.py"), "--config", str(tmp / "tiny.yml"),
           "--train_d_path", str(tmp / "data/train"), "--val_d_path", str(tmp / "data/val"),
           "--checkpoint-path", str(tmp / out), "--ckpt-interval", "2", "--seed", "3", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_short_training_lowers_loss_and_resume_matches_uninterrupted(tmp_path):
    _tiny_dataset(tmp_path / "data")
    full = _train(tmp_path, "full", "--epochs", "4")
    assert full.returncode == 0, full.stderr[-2000:]
    rows = [line.split(",") for line in (tmp_path / "full/log.csv").read_text().splitlines()[1:]]
    assert len(rows) == 4
    rec_losses = [float(r[2]) for r in rows]
    assert rec_losses[-1] < rec_losses[0]
    # the GAN switched on at step 6 (epoch 3 of 2 steps each) without breaking anything
    assert all(np.isfinite(rec_losses))

    half = _train(tmp_path, "half", "--epochs", "4", "--max-steps", "5")
    assert half.returncode == 0, half.stderr[-2000:]
    assert load_training_state(tmp_path / "half/training_state.pt")["step"] == 5
    resumed = _train(tmp_path, "half", "--epochs", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_training_state(tmp_path / "full/training_state.pt")["model"]
    b = load_training_state(tmp_path / "half/training_state.pt")["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k

    # the weights file is a plain fp16 state_dict that the model of the saved config loads strictly
    weights = load_weights(tmp_path / "full/VQGAN.pt")
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    model = load_vqgan(tmp_path / "full/VQGAN.yml", tmp_path / "full/VQGAN.pt")
    assert not model.training
    with pytest.raises(CheckpointError, match="training-state"):
        load_vqgan(tmp_path / "full/VQGAN.yml", tmp_path / "full/training_state.pt")


def test_bad_data_folder_is_one_line_and_exit_2(tmp_path):
    r = _train(tmp_path, "x", "--epochs", "1")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "train" in r.stderr
