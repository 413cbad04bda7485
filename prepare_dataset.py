"""Build the lab's dataset layout from the real 64x64 cat faces.

    python prepare_dataset.py --source cats.zip --output cat_face --seed 0
    CAT_FACES_ZIP=cats.zip python prepare_dataset.py        # the same
    python prepare_dataset.py          # on the project's machines: ../shared/data/cat_faces_64x64.zip -> ./cat_face

The archive is the public Kaggle set "Cats faces 64x64 (For generative models)" (README "Data").

Output (lab names): train/image_%05d.png, val/image_%05d.png, masked_image/image_%03d.png,
mask64/mask_%03d.png (L, 255 = known, 0 = hole), test_gt/image_%03d.png, test_gt.csv and dataset.json.

The split (exact copies collapsed, near-copies kept within one split, so that no test cat leaks into
training) and the test holes come from utils/cat_faces.py, which the GPU campaign shares. The same source
and flags always give byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from utils.cat_faces import (DEFAULT_SOURCE, CatFaces, DatasetError, dataset_identity, list_images, same_dataset,
                              split_dataset)
from utils.checkpoint import ensure_writable_dir
from utils.cli import OneLineParser, run_cli
from utils.data import write_gt_csv
from utils.image import HOLE_GRAY, save_png

MANIFEST = "dataset.json"


def _name_width(n: int, lab_width: int) -> int:
    """The lab's zero padding, widened if needed so that sorted names stay in index order."""
    return max(lab_width, len(str(n - 1)))


def write_dataset(folder: Path, data: CatFaces) -> None:
    """Write every file of the layout into `folder`."""
    for name in ("train", "val", "masked_image", "mask64", "test_gt"):
        (folder / name).mkdir(parents=True)
    for name in ("train", "val"):
        images = getattr(data, name)
        w = _name_width(len(images), 5)
        for k, image in enumerate(tqdm(images, desc=f"write {name}", unit="img", mininterval=1, delay=1)):
            save_png(image, folder / name / f"image_{k:0{w}d}.png")
    w = _name_width(len(data.test), 3)
    for k, (gt, hole) in enumerate(tqdm(zip(data.test, data.test_holes), total=len(data.test), desc="write test",
                                        unit="img", mininterval=1, delay=1)):
        masked = gt.copy()
        masked[hole] = HOLE_GRAY
        save_png(gt, folder / "test_gt" / f"image_{k:0{w}d}.png")
        save_png(masked, folder / "masked_image" / f"image_{k:0{w}d}.png")
        save_png(np.where(hole, 0, 255).astype(np.uint8), folder / "mask64" / f"mask_{k:0{w}d}.png")
    write_gt_csv(folder / "test_gt.csv", data.test)


def check_existing(output: Path, wanted: dict) -> bool:
    """True when `output` already holds this exact dataset; DatasetError when it holds something else."""
    if not output.exists() or not any(output.iterdir()):
        return False
    try:
        have = json.loads((output / MANIFEST).read_text())
    except (OSError, ValueError):
        raise DatasetError(f"{output}: folder is not empty and has no readable {MANIFEST}; "
                           f"pass --force to replace it or choose another --output")
    if not same_dataset(have, wanted):
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
    names = list_images(source)
    manifest = dataset_identity(source, names, args.seed, args.test_size, args.val_fraction)
    if output.exists() and not output.is_dir():
        raise DatasetError(f"{output}: exists and is not a folder; choose another --output")
    ensure_writable_dir(output.parent, "--output")  # the dataset is built beside it, then renamed into place
    if not args.force and check_existing(output, manifest):
        print(f"{output} is up to date ({MANIFEST} matches the source and flags); nothing to do")
        return

    data = split_dataset(source, names, args.seed, args.test_size, args.val_fraction)
    tmp = output.parent / f".{output.name}.{os.getpid()}.tmp"  # sibling: the final rename is atomic
    old = output.parent / f".{output.name}.{os.getpid()}.old"
    try:
        write_dataset(tmp, data)
        ratios = data.test_holes.mean(axis=(1, 2))
        manifest["counts"] = data.counts
        manifest["hole_ratio_stats"] = {"min": round(float(ratios.min()), 4), "mean": round(float(ratios.mean()), 4),
                                        "max": round(float(ratios.max()), 4)}
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
