"""Build the lab's dataset layout from the real 64x64 cat faces.

    python prepare_dataset.py --source cats.zip --output cat_face --seed 0
    CAT_FACES_ZIP=cats.zip python prepare_dataset.py        # the same
    python prepare_dataset.py          # on the project's machines: ../shared/data/cat_faces_64x64.zip -> ./cat_face

The archive is the public Kaggle set "Cats faces 64x64 (For generative models)" (README "Data").

Output (lab names): train/image_%05d.png, val/image_%05d.png, masked_image/image_%03d.png,
mask64/mask_%03d.png (L, 255 = known, 0 = hole), test_gt/image_%03d.png, test_gt.csv and dataset.json.

Why not just split the files: the archive holds ~5,900 exact copies and ~90 groups of near-copies
(the same photo shifted, rescaled or re-exposed). Split naively, test cats leak into training and
every FID is flattering. So exact copies are collapsed to one image, near-copies are grouped, and
whole groups go to one split. The same source and flags always give byte-identical files.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from utils.checkpoint import ensure_writable_dir
from utils.cli import OneLineParser, UserError, run_cli
from utils.data import write_gt_csv
from utils.image import HOLE_GRAY, IMAGE_SIZE, read_rgb, save_png
from utils.masks import HOLE_RATIO, stroke_mask

FORMAT = "maskgit-cat-face-dataset/1"
MANIFEST = "dataset.json"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
# Cosine similarity of brightness-normalised 16x16 grey thumbnails above which two images count as the
# same photo. Chosen by eye on the real set: >= 0.95 is almost always the same cat (shifted, rescaled,
# re-exposed); at 0.93 different cats in the same pose start to merge.
NEAR_DUP_COSINE = 0.95
DEFAULT_SOURCE = Path(__file__).resolve().parent.parent / "shared" / "data" / "cat_faces_64x64.zip"


class DatasetError(UserError):
    """A problem the user must fix; printed as one line."""


class _NamedBytes(io.BytesIO):
    """Archive member bytes that print as 'archive.zip/member', so read_rgb's errors name the member."""

    def __init__(self, data: bytes, label: str):
        super().__init__(data)
        self.label = label

    def __str__(self) -> str:
        return self.label


def _natural_key(name: str) -> list:
    """Sort cats/2.jpg before cats/10.jpg."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _is_image(relpath: str) -> bool:
    # hidden entries (e.g. macOS '._x.jpg' resource forks, __MACOSX/) are metadata, not images
    parts = relpath.split("/")
    return Path(relpath).suffix.lower() in IMAGE_SUFFIXES and not any(
        p.startswith(".") or p == "__MACOSX" for p in parts)


def list_images(source: Path) -> list[str]:
    """Image paths inside a .zip or a folder (any nesting), relative, in natural order."""
    if source.is_dir():
        names = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
    elif source.is_file():
        try:
            with zipfile.ZipFile(source) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/")]
        except (zipfile.BadZipFile, OSError) as e:
            raise DatasetError(f"{source}: not a readable zip archive ({e}); pass a .zip or a folder of images")
    else:
        raise DatasetError(f"{source}: source not found; download the cat-face archive (README \"Data\") and pass "
                           "--source FILE.zip or set CAT_FACES_ZIP")
    names = sorted((n for n in names if _is_image(n)), key=_natural_key)
    if not names:
        raise DatasetError(f"{source}: holds no .jpg/.png images")
    return names


def source_fingerprint(source: Path, names: list[str]) -> dict:
    """Identify the source by content, so a moved or renamed archive is still recognised."""
    h = hashlib.sha256()
    if source.is_dir():  # hash of every image's path and bytes
        for n in names:
            h.update(n.encode() + b"\0" + (source / n).read_bytes())
        size = sum((source / n).stat().st_size for n in names)
    else:  # the archive's own sha256, as published in SHA256SUMS
        with open(source, "rb") as f:
            h = hashlib.file_digest(f, "sha256")
        size = source.stat().st_size
    return {"name": source.name, "kind": "folder" if source.is_dir() else "zip",
            "bytes": size, "sha256": h.hexdigest()}


def load_images(source: Path, names: list[str]) -> np.ndarray:
    """Decode every image to uint8 [N,64,64,3]; a bad image raises DatasetError naming it."""
    out = np.empty((len(names), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    zf = None if source.is_dir() else zipfile.ZipFile(source)
    try:
        for i, n in enumerate(tqdm(names, desc="decode", unit="img", mininterval=1, delay=1)):
            f = source / n if zf is None else _NamedBytes(zf.read(n), f"{source}/{n}")
            out[i] = read_rgb(f)
    except ValueError as e:
        raise DatasetError(str(e)) from e
    except zipfile.BadZipFile as e:
        raise DatasetError(f"{source}: damaged zip archive ({e}); download it again") from e
    finally:
        if zf is not None:
            zf.close()
    return out


def first_copies(images: np.ndarray) -> np.ndarray:
    """Indices of the first copy of every distinct image (identical decoded pixels), in input order."""
    seen: set[bytes] = set()
    keep = []
    for i, a in enumerate(images):
        key = hashlib.blake2b(a.tobytes(), digest_size=16).digest()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return np.array(keep, dtype=np.int64)


def near_duplicate_groups(images: np.ndarray, threshold: float = NEAR_DUP_COSINE,
                          chunk: int = 2048) -> np.ndarray:
    """Group label per image: connected components of 'thumbnail cosine >= threshold'.

    A 16x16 grey thumbnail (4x4 block means) barely changes when the photo moves by a pixel or two;
    removing its mean and norm makes it blind to exposure changes. All pairs are compared exactly
    (one matrix product per chunk: ~1 s for 9k images); transitive closure is the union-find step.
    """
    n = len(images)
    g = images.mean(axis=3, dtype=np.float32)
    thumbs = g.reshape(n, IMAGE_SIZE // 4, 4, IMAGE_SIZE // 4, 4).mean(axis=(2, 4)).reshape(n, -1)
    thumbs -= thumbs.mean(axis=1, keepdims=True)
    thumbs /= np.maximum(np.linalg.norm(thumbs, axis=1, keepdims=True), 1e-6)
    rows, cols = [], []
    for start in range(0, n, chunk):
        r, c = np.nonzero(thumbs[start:start + chunk] @ thumbs.T >= threshold)
        r += start
        rows.append(r[r < c])
        cols.append(c[r < c])
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), np.int8), (r, c)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _fill(groups: list[np.ndarray], order: list[int], want: int, what: str) -> tuple[list[int], list[int]]:
    """Take whole groups in `order` until exactly `want` images; returns (taken, left) group ids."""
    taken, left = [], []
    for g in order:
        if want >= len(groups[g]):
            taken.append(g)
            want -= len(groups[g])
        else:
            left.append(g)
    if want:
        raise DatasetError(f"cannot fill the {what} split exactly with whole near-duplicate groups; "
                           f"change --test-size or --val-fraction")
    return taken, left


def split_groups(labels: np.ndarray, test_size: int, val_fraction: float,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random split of image indices into test/val/train that keeps every group in one split."""
    n = len(labels)
    n_val = round(val_fraction * (n - test_size))
    if test_size < 1:
        raise DatasetError(f"--test-size {test_size}: must be at least 1")
    if test_size + max(n_val, 1) >= n:
        raise DatasetError(f"--test-size {test_size} with --val-fraction {val_fraction} leaves no training "
                           f"images out of {n} distinct ones; lower them")
    if n_val < 1:
        raise DatasetError(f"--val-fraction {val_fraction} gives an empty val split; raise it")
    groups = np.split(np.argsort(labels, kind="stable"), np.cumsum(np.bincount(labels))[:-1])
    test, rest = _fill(groups, list(rng.permutation(len(groups))), test_size, "test")
    val, train = _fill(groups, rest, n_val, "val")
    return {name: np.sort(np.concatenate([groups[g] for g in ids]))
            for name, ids in (("train", train), ("val", val), ("test", test))}


def _name_width(n: int, lab_width: int) -> int:
    """The lab's zero padding, widened if needed so that sorted names stay in index order."""
    return max(lab_width, len(str(n - 1)))


def write_dataset(folder: Path, images: np.ndarray, split: dict[str, np.ndarray],
                  rng: np.random.Generator) -> list[float]:
    """Write every file of the layout into `folder`; returns the hole ratio of each test mask."""
    for name in ("train", "val", "masked_image", "mask64", "test_gt"):
        (folder / name).mkdir(parents=True)
    for name in ("train", "val"):
        w = _name_width(len(split[name]), 5)
        for k, i in enumerate(tqdm(split[name], desc=f"write {name}", unit="img", mininterval=1, delay=1)):
            save_png(images[i], folder / name / f"image_{k:0{w}d}.png")
    test = images[split["test"]]
    w = _name_width(len(test), 3)
    ratios = []
    for k, gt in enumerate(tqdm(test, desc="write test", unit="img", mininterval=1, delay=1)):
        hole = stroke_mask(rng)
        masked = gt.copy()
        masked[hole] = HOLE_GRAY
        save_png(gt, folder / "test_gt" / f"image_{k:0{w}d}.png")
        save_png(masked, folder / "masked_image" / f"image_{k:0{w}d}.png")
        save_png(np.where(hole, 0, 255).astype(np.uint8), folder / "mask64" / f"mask_{k:0{w}d}.png")
        ratios.append(float(hole.mean()))
    write_gt_csv(folder / "test_gt.csv", test)
    return ratios


def _identity(manifest: dict) -> tuple:
    """What makes two datasets the same: source content, parameters and layout version."""
    return manifest.get("format"), manifest.get("source", {}).get("sha256"), manifest.get("params")


def check_existing(output: Path, wanted: dict) -> bool:
    """True when `output` already holds this exact dataset; DatasetError when it holds something else."""
    if not output.exists() or not any(output.iterdir()):
        return False
    try:
        have = json.loads((output / MANIFEST).read_text())
    except (OSError, ValueError):
        raise DatasetError(f"{output}: folder is not empty and has no readable {MANIFEST}; "
                           f"pass --force to replace it or choose another --output")
    if _identity(have) != _identity(wanted):
        raise DatasetError(f"{output}: holds a different dataset (other source or flags); "
                           f"pass --force to rebuild it or choose another --output")
    counts = have.get("counts", {})
    for sub, key in (("train", "train"), ("val", "val"), ("masked_image", "test"), ("mask64", "test"),
                     ("test_gt", "test")):
        if len(list((output / sub).glob("*.png"))) != counts.get(key):
            raise DatasetError(f"{output}/{sub}: file count differs from {MANIFEST}; pass --force to rebuild")
    return True


def build(args: argparse.Namespace) -> None:
    t0 = time.time()
    source, output = Path(args.source), Path(args.output)
    if not 0 < args.val_fraction < 1:
        raise DatasetError(f"--val-fraction {args.val_fraction}: must be between 0 and 1")
    names = list_images(source)
    manifest = {"format": FORMAT, "source": source_fingerprint(source, names),
                "params": {"seed": args.seed, "test_size": args.test_size, "val_fraction": args.val_fraction,
                           "near_dup_cosine": NEAR_DUP_COSINE, "hole_ratio": list(HOLE_RATIO)}}
    if output.exists() and not output.is_dir():
        raise DatasetError(f"{output}: exists and is not a folder; choose another --output")
    ensure_writable_dir(output.parent, "--output")  # the dataset is built beside it, then renamed into place
    if not args.force and check_existing(output, manifest):
        print(f"{output} is up to date ({MANIFEST} matches the source and flags); nothing to do")
        return

    images = load_images(source, names)
    keep = first_copies(images)
    images = images[keep]
    labels = near_duplicate_groups(images)
    sizes = np.bincount(labels)
    split_rng, mask_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(args.seed).spawn(2))
    split = split_groups(labels, args.test_size, args.val_fraction, split_rng)

    tmp = output.parent / f".{output.name}.{os.getpid()}.tmp"  # sibling: the final rename is atomic
    old = output.parent / f".{output.name}.{os.getpid()}.old"
    try:
        ratios = write_dataset(tmp, images, split, mask_rng)
        manifest["counts"] = {
            "source_files": len(names), "exact_duplicates_dropped": len(names) - len(keep),
            "distinct": len(keep), "near_dup_groups": int((sizes > 1).sum()),
            "near_dup_images": int(sizes[sizes > 1].sum()),
            **{k: len(v) for k, v in split.items()}}
        manifest["hole_ratio_stats"] = {"min": round(min(ratios), 4), "mean": round(float(np.mean(ratios)), 4),
                                        "max": round(max(ratios), 4)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if output.exists():
            output.rename(old)
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and output.exists():
            shutil.rmtree(old)
        elif old.exists():  # the swap did not complete: put the previous dataset back
            old.rename(output)
    c = manifest["counts"]
    print(f"{output}: train {c['train']}, val {c['val']}, test {c['test']} | {c['source_files']} files, "
          f"{c['exact_duplicates_dropped']} exact copies dropped, {c['near_dup_groups']} near-duplicate groups "
          f"({c['near_dup_images']} images) kept within one split | {time.time() - t0:.1f} s")


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", default=os.environ.get("CAT_FACES_ZIP", str(DEFAULT_SOURCE)),
                   help="a .zip or a folder of 64x64 .jpg/.png cat faces (env CAT_FACES_ZIP)")
    p.add_argument("--output", default="./cat_face", help="dataset folder to create")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the masks")
    p.add_argument("--test-size", type=int, default=747, help="number of test images (the lab uses 747)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the non-test images for val")
    p.add_argument("--force", action="store_true", help="rebuild even if --output holds another dataset")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    # on Ctrl-C build() has removed its half-built folder; any previous dataset is untouched
    return run_cli(lambda: build(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
