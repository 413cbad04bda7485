"""Datasets of the lab layout (see prepare_dataset.py), its masks, and the ground truth of a masked test set.

Images are small (64x64), so every dataset decodes its whole folder once, at construction, into one
uint8 array: ~90 MB for the 7k training images, and no PNG decoding in the training loop.
"""
from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from utils.fid import read_csv_images
from utils.image import HOLE_GRAY, IMAGE_SIZE, normalize, read_rgb, uint8_to_tensor

CSV_ROW = IMAGE_SIZE * IMAGE_SIZE * 3  # one image per row: 64*64*3 uint8 values in H,W,C order


def _png_files(folder: str | Path, what: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: {what} folder not found; run prepare_dataset.py or pass the right path")
    files = sorted(folder.glob("*.png"))
    if not files:
        raise ValueError(f"{folder}: {what} folder holds no .png images")
    return files


def _read_all(files: list[Path], desc: str, gray_ok: bool = True) -> np.ndarray:
    bar = tqdm(files, desc=desc, unit="img", leave=False, mininterval=1, delay=1)
    return np.stack([read_rgb(f, gray_ok=gray_ok) for f in bar])


class ImageFolderDataset(Dataset):
    """All `*.png` of a folder (sorted), as normalized float tensors [3,64,64].

    hflip: random horizontal flip with probability 1/2 (torch RNG, so DataLoader seeding applies).
    """

    def __init__(self, folder: str | Path, split: str = "train", hflip: bool = False):
        self.paths = _png_files(folder, "image")
        self.split = split
        self.hflip = hflip
        self.images = _read_all(self.paths, f"load {Path(folder).name}")  # uint8 [N,64,64,3]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = normalize(uint8_to_tensor(self.images[i]), self.split)
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x


class InpaintingTestSet(Dataset):
    """Masked test images paired with their masks by sorted file name (the lab's convention), checked by the
    number in the names when they carry one.

    Item: (masked image normalized [3,64,64], known mask bool [1,64,64] with True = known pixel, index).
    `.names` are the masked images' file names, `.images` the raw uint8 masked images [N,64,64,3] and
    `.known` the bool masks [N,64,64], for pasting the known pixels back exactly.

    Masked images must be 64x64 RGB (a grayscale one is refused: it is usually a mask in the wrong folder).
    Masks must be 64x64; any PIL mode is converted to grayscale "L". Masks that are not strictly
    0/255 (e.g. saved as JPEG) are thresholded at 128 (>= 128 = known) with a single warning.
    """

    def __init__(self, masked_dir: str | Path, mask_dir: str | Path, split: str = "test"):
        image_files = _png_files(masked_dir, "masked image")
        mask_files = _png_files(mask_dir, "mask")
        mask_files = _pair(image_files, mask_files)
        self.split = split
        self.names = [f.name for f in image_files]
        self.images = _read_all(image_files, "load masked images", gray_ok=False)
        masks = np.stack([_read_mask(f) for f in mask_files])
        soft = [f.name for f, m in zip(mask_files, masks) if not np.isin(m, (0, 255)).all()]
        if soft:
            warnings.warn(f"{mask_dir}: {len(soft)} masks (first: {soft[0]}) are not strictly 0/255; "
                          f"thresholded at 128 (>= 128 = known pixel)", stacklevel=2)
        self.known = masks >= 128

    @classmethod
    def with_holes(cls, images: np.ndarray, names: list[str], holes: np.ndarray,
                   split: str = "val") -> "InpaintingTestSet":
        """Clean uint8 images [N,64,64,3] with the holes bool [N,64,64] (True = hole; e.g. utils.masks.fixed_holes)
        painted gray, as prepare_dataset.py makes the test set: an inpainting set on val, to tune decoding without
        the test split."""
        self = cls.__new__(cls)
        self.split, self.names = split, list(names)
        self.known = ~holes
        self.images = np.where(self.known[..., None], images, np.uint8(HOLE_GRAY))
        return self

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x = normalize(uint8_to_tensor(self.images[i]), self.split)
        return x, torch.from_numpy(self.known[i])[None], i


def _number(path: Path) -> int | None:
    """The index in a lab file name (image_012.png, mask_012.png -> 12); None without digits."""
    digits = re.findall(r"\d+", path.stem)
    return int(digits[-1]) if digits else None


def _pair(image_files: list[Path], mask_files: list[Path]) -> list[Path]:
    """The masks in the order of the images. The lab pairs by sorted name; when every name carries a distinct
    number (image_012.png, mask_012.png), a file whose number has no partner (a renamed or foreign file) is
    named in the error instead of shifting every later pair."""
    images = {_number(f): f for f in image_files}
    masks = {_number(f): f for f in mask_files}
    numbered = None not in images and None not in masks and len(images) == len(image_files) \
        and len(masks) == len(mask_files)
    counts = (f"{len(image_files)} masked images in {image_files[0].parent}, {len(mask_files)} masks in "
              f"{mask_files[0].parent}: they are paired by sorted name, so their counts and numbers must match")
    if numbered:
        lonely = [(f, "masked image") for n, f in masks.items() if n not in images] + \
                 [(f, "mask") for n, f in images.items() if n not in masks]
        if lonely:
            f, other = lonely[0]
            raise ValueError(f"{f}: no {other} numbered {_number(f)}; add it or remove this file ({counts})")
        return [masks[_number(f)] for f in image_files]
    if len(image_files) != len(mask_files):
        raise ValueError(counts)
    return mask_files


def _read_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            m = np.asarray(im.convert("L"))
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: cannot read mask ({e}); replace the file") from e
    if m.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{path}: mask is {m.shape[1]}x{m.shape[0]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
    return m


def read_known_masks(folder: str | Path) -> np.ndarray:
    """Every mask of a folder (sorted by name; 255 = known, 0 = hole) as bool [N,64,64], True = known pixel;
    values in between count as known from 128 up, as in InpaintingTestSet."""
    return np.stack([_read_mask(f) for f in _png_files(folder, "mask")]) >= 128


def load_test_set(masked_dir: str | Path, mask_dir: str | Path) -> InpaintingTestSet:
    """The lab's masked test set for the scripts: a missing folder is named by its flag, and the soft-mask warning
    is printed as one line instead of Python's two."""
    for flag, folder in (("--test-maskedimage-path", masked_dir), ("--test-mask-path", mask_dir)):
        if not Path(folder).is_dir():
            raise ValueError(f"{flag} {folder}: folder not found; prepare the dataset or pass the right folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = InpaintingTestSet(masked_dir, mask_dir, split="test")
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return dataset


def ground_truth_of(dataset: InpaintingTestSet, gt: str | Path | None, masked_dir: str | Path
                      ) -> np.ndarray | None:
    """uint8 [N,64,64,3] ground truth of `dataset`: `gt` (--gt: the lab's test_gt.csv or a folder of PNGs) when
    given, else test_gt.csv or test_gt/ beside the masked-image folder (where prepare_dataset.py puts them), else
    None. The csv is read by the FID tool's reader, the one reader of that format."""
    if gt is not None and not Path(gt).exists():
        raise ValueError(f"--gt {gt}: not found; pass test_gt.csv or a folder of images")
    parent = Path(masked_dir).parent
    path = Path(gt) if gt is not None else next(
        (p for p in (parent / "test_gt.csv", parent / "test_gt") if p.exists()), None)
    if path is None:
        return None
    images = _read_all(_png_files(path, "ground-truth"), "load ground truth") if path.is_dir() \
        else read_csv_images(path)
    if len(images) != len(dataset):
        raise ValueError(f"{path}: {len(images)} ground-truth images for {len(dataset)} test images; "
                         "pass the matching --gt")
    return images


def write_gt_csv(path: str | Path, images: np.ndarray) -> None:
    """uint8 [N,64,64,3] -> the lab's csv: header '0,1,...,12287' (pandas' default), one image per row."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"write_gt_csv: expected uint8 [N,{IMAGE_SIZE},{IMAGE_SIZE},3], got "
                         f"{images.dtype} {list(images.shape)}")
    with open(path, "w") as f:
        f.write(",".join(map(str, range(CSV_ROW))) + "\n")
        for row in images.reshape(len(images), -1):
            f.write(",".join(map(str, row.tolist())) + "\n")
