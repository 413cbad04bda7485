"""utils/data.py: folder datasets, the masked test set and the lab's ground-truth csv."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.data import ImageFolderDataset, InpaintingTestSet, write_gt_csv
from utils.fid import read_csv_images as read_gt_csv
from utils.image import denormalize, save_png, to_uint8


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def _write(folder: Path, arrays, pattern: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        save_png(a, folder / (pattern % i))
    return folder


def _masks(n: int, seed: int = 1) -> np.ndarray:
    return np.where(np.random.default_rng(seed).random((n, 64, 64)) < 0.3, 0, 255).astype(np.uint8)


def test_image_folder_round_trip_and_flip(tmp_path):
    imgs = _images(5)
    folder = _write(tmp_path / "train", imgs[::-1], "image_%05d.png")  # sorted name order = reversed imgs
    ds = ImageFolderDataset(folder, split="train")
    assert len(ds) == 5 and ds[0].shape == (3, 64, 64) and ds[0].dtype == torch.float32
    np.testing.assert_array_equal(to_uint8(denormalize(ds[0], "train")), imgs[-1])
    flipped = ImageFolderDataset(folder, split="train", hflip=True)
    torch.manual_seed(0)
    seen = {bool(torch.equal(flipped[1], ds[1].flip(-1))) for _ in range(20)}
    assert seen == {True, False}  # both orientations occur
    assert not torch.equal(ImageFolderDataset(folder, split="test")[0], ds[0])  # split statistics are used


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_image_folder_missing_or_empty_names_the_folder(tmp_path, make):
    folder = tmp_path / "val"
    if make == "empty":
        folder.mkdir()
    with pytest.raises(ValueError, match=str(folder)):
        ImageFolderDataset(folder)


def test_inpainting_test_set_items(tmp_path):
    imgs, masks = _images(4), _masks(4)
    mdir = _write(tmp_path / "masked_image", imgs, "image_%03d.png")
    kdir = _write(tmp_path / "mask64", masks, "mask_%03d.png")
    ds = InpaintingTestSet(mdir, kdir)
    x, known, idx = ds[2]
    assert x.shape == (3, 64, 64) and known.shape == (1, 64, 64) and known.dtype == torch.bool and idx == 2
    np.testing.assert_array_equal(known[0].numpy(), masks[2] == 255)
    np.testing.assert_array_equal(to_uint8(denormalize(x, "test")), imgs[2])
    np.testing.assert_array_equal(ds.images, imgs)
    assert ds.names == [f"image_{i:03d}.png" for i in range(4)]


def test_soft_masks_are_thresholded_with_one_warning(tmp_path):
    masks = _masks(3)
    masks[0, 0, :4] = [1, 127, 128, 254]
    masks[1, 5, 5] = 200
    mdir = _write(tmp_path / "m", _images(3), "image_%03d.png")
    kdir = _write(tmp_path / "k", masks, "mask_%03d.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = InpaintingTestSet(mdir, kdir)
    assert len(caught) == 1 and "2 masks" in str(caught[0].message)
    assert ds.known[0, 0, :4].tolist() == [False, False, True, True] and ds.known[1, 5, 5]


def test_rgb_mask_is_converted(tmp_path):
    mdir = _write(tmp_path / "m", _images(1), "image_%03d.png")
    rgb = np.repeat(_masks(1)[..., None], 3, axis=3)
    kdir = _write(tmp_path / "k", rgb, "mask_%03d.png")
    np.testing.assert_array_equal(InpaintingTestSet(mdir, kdir).known, _masks(1) == 255)


@pytest.mark.parametrize("case", ["count", "mask_size", "image_size", "empty"])
def test_inpainting_test_set_rejects_bad_input(tmp_path, case):
    mdir = _write(tmp_path / "m", _images(3), "image_%03d.png")
    kdir = _write(tmp_path / "k", _masks(3), "mask_%03d.png")
    if case == "count":
        (kdir / "mask_002.png").unlink()
        match = "paired by sorted name"
    elif case == "mask_size":
        save_png(np.zeros((32, 64), np.uint8), kdir / "mask_001.png")
        match = "mask_001.png: mask is 64x32"
    elif case == "image_size":
        save_png(np.zeros((64, 60, 3), np.uint8), mdir / "image_001.png")
        match = "image_001.png: image is 60x64"
    else:
        for f in kdir.iterdir():
            f.unlink()
        match = "no .png"
    with pytest.raises(ValueError, match=match):
        InpaintingTestSet(mdir, kdir)


def test_gt_csv_round_trip_and_layout(tmp_path):
    imgs = _images(3)
    path = tmp_path / "test_gt.csv"
    write_gt_csv(path, imgs)
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and lines[0].split(",")[:2] == ["0", "1"] and len(lines[0].split(",")) == 12288
    first = [int(v) for v in lines[1].split(",")]
    assert first[:6] == imgs[0, 0, :2].reshape(-1).tolist()  # H,W,C order
    np.testing.assert_array_equal(read_gt_csv(path), imgs)


@pytest.mark.parametrize("content, match", [
    ("h\n" + ",".join(["1"] * 100) + "\n", "100 values, expected 12288"),
    ("h\n" + ",".join(["1"] * 12288) + "\n1,2\n", "12288 values per row"),
    ("h\n", "no images"),
    ("h\n" + ",".join(["300"] * 12288) + "\n", "0..255"),
])
def test_gt_csv_rejects_bad_rows(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warns about an empty file before we raise
        with pytest.raises(ValueError, match=match):
            read_gt_csv(path)


def test_gt_csv_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_gt_csv(tmp_path / "none.csv")
