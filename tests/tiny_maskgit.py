"""A tiny MaskGIT setup written into a temporary folder: random VQGAN weights, configs and synthetic images.

Shared by the stage-2 tests so that each of them runs in seconds on one CPU thread.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml

from models.Transformer import BidirectionalTransformer
from models.VQGAN import VQGAN, load_vqgan
from training.token_cache import ensure_token_cache
from utils.data import write_gt_csv
from utils.image import save_png

REPO = Path(__file__).resolve().parents[1]

# the smallest VQGAN with 32-group GroupNorm for 64x64 -> 16x16 (two resamples); thinner ones (fewer groups)
# give random weights that map most patches to one or two codes, which leaves nothing to learn
TINY_VQGAN = {"image_channels": 3, "enc_channels": [32, 64, 96], "dec_channels": [32, 64, 96], "latent_dim": 16,
              "img_resolution": 64, "latent_resolution": 16, "num_codebook_vectors": 32, "beta": 0.25}
TINY_TRANSFORMER = {"num_image_tokens": 256, "num_codebook_vectors": 32, "dim": 32, "n_layers": 2, "hidden_dim": 64,
                    "num_heads": 4}


@dataclass
class TinySetup:
    root: Path
    vq_config: Path
    vq_ckpt: Path
    maskgit_config: Path
    train_dir: Path
    val_dir: Path


def write_images(folder: Path, n: int, seed: int) -> None:
    """Blocky random colour images: distinct per image, so that their tokens differ."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        blocks = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        save_png(np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8)), folder / f"image_{i:05d}.png")


def make_tiny_setup(root: Path, n_train: int = 8, n_val: int = 4, seed: int = 0) -> TinySetup:
    root.mkdir(parents=True, exist_ok=True)
    vq_config, vq_ckpt, maskgit_config = root / "VQGAN_tiny.yml", root / "VQGAN.pt", root / "MaskGit_tiny.yml"
    vq_config.write_text(yaml.safe_dump({"model_param": TINY_VQGAN}))
    torch.manual_seed(seed)
    torch.save(VQGAN(TINY_VQGAN).state_dict(), vq_ckpt)
    maskgit_config.write_text(yaml.safe_dump({"model_param": {
        "VQ_Configs": {"VQ_config_path": str(vq_config), "VQ_CKPT_path": str(vq_ckpt)},
        "num_image_tokens": 256, "num_codebook_vectors": 32, "choice_temperature": 4.5, "gamma_type": "cosine",
        "Transformer_param": TINY_TRANSFORMER}}))
    write_images(root / "train", n_train, seed)
    write_images(root / "val", n_val, seed + 1)
    return TinySetup(root, vq_config, vq_ckpt, maskgit_config, root / "train", root / "val")


def make_tiny_setup_with_cache(root: Path) -> TinySetup:
    """A tiny setup and `.cache`, the fp32 token cache of its train images (validating on them too)."""
    setup = make_tiny_setup(root)
    setup.cache = setup.root / "tokens.pt"
    ensure_token_cache(load_vqgan(setup.vq_config, setup.vq_ckpt), setup.vq_ckpt, setup.train_dir, setup.train_dir,
                       setup.cache, torch.device("cpu"), precision="fp32", verbose=False)
    return setup


def exit_code(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """A script's main(argv) as the shell sees it: its return value, or the status argparse exits with."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def one_line_error(main: Callable[[list[str]], int], argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run a script's main(argv), which must exit 2 with exactly one line on stderr; return that line."""
    capsys.readouterr()
    code = exit_code(main, argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def brush_masks(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Free-form random-walk strokes covering about a quarter of the image: bool [n, 1, size, size], True = known."""
    rng = np.random.default_rng(seed)
    known = np.ones((n, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        y, x = rng.uniform(0, size, 2)
        while (~known[i]).mean() < 0.25:
            y = np.clip(y + rng.normal(0, 4), 0, size - 1)
            x = np.clip(x + rng.normal(0, 4), 0, size - 1)
            known[i] &= (yy - y) ** 2 + (xx - x) ** 2 > 9
    return torch.from_numpy(known)[:, None]


def write_masked_test_set(data: Path, gt: np.ndarray, known: np.ndarray) -> None:
    """The lab's test layout in `data`: masked_image/ (holes gray), mask64/ (255 = known) and test_gt.csv."""
    for folder in ("masked_image", "mask64"):
        (data / folder).mkdir(parents=True)
    for i in range(len(gt)):
        save_png(np.where(known[i, ..., None], gt[i], 128).astype(np.uint8), data / "masked_image" / f"image_{i:03d}.png")
        save_png(known[i].astype(np.uint8) * 255, data / "mask64" / f"mask_{i:03d}.png")
    write_gt_csv(data / "test_gt.csv", gt)


def random_transformer_checkpoint(root: Path) -> Path:
    """root/transformer.pt: a TINY_TRANSFORMER with seed-0 random weights, as the lab's inpainting loads it."""
    torch.manual_seed(0)
    ckpt = root / "transformer.pt"
    torch.save(BidirectionalTransformer(TINY_TRANSFORMER).state_dict(), ckpt)
    return ckpt
