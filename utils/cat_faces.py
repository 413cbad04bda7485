"""The cat-face dataset in memory: read a .zip or folder of 64x64 faces, collapse exact copies, keep near-copies
together, split into train / val / test and draw the test holes.

prepare_dataset.py writes this dataset in the lab's layout; the GPU campaign (training/campaign.py) and its scorer
build the same arrays from the same source and flags without writing it, so their val and test images are the
prepared dataset's, image for image.

Why not just split the files: the archive holds ~5,900 exact copies and ~90 groups of near-copies (the same photo
shifted, rescaled or re-exposed). Split naively, test cats leak into training and every FID is flattering. So exact
copies are collapsed to one image, near-copies are grouped, and whole groups go to one split. The same source and
flags always give the same arrays.
"""
from __future__ import annotations

import hashlib
import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from utils.cli import UserError
from utils.image import IMAGE_SIZE, read_rgb
from utils.masks import HOLE_RATIO, stroke_mask

FORMAT = "maskgit-cat-face-dataset/1"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
# Cosine similarity of brightness-normalised 16x16 grey thumbnails above which two images count as the
# same photo. Chosen by eye on the real set: >= 0.95 is almost always the same cat (shifted, rescaled,
# re-exposed); at 0.93 different cats in the same pose start to merge.
NEAR_DUP_COSINE = 0.95
DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cat_faces_64x64.zip"


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


def dataset_identity(source: Path, names: list[str], seed: int, test_size: int, val_fraction: float,
                     first_files: int | None = None) -> dict:
    """What makes two datasets the same (prepare_dataset.py's dataset.json holds it): the source's content, the
    flags and the layout version. `first_files`: only the first N images of the source were used (a smoke run)."""
    if not 0 < val_fraction < 1:
        raise DatasetError(f"--val-fraction {val_fraction}: must be between 0 and 1")
    params = {"seed": seed, "test_size": test_size, "val_fraction": val_fraction, "near_dup_cosine": NEAR_DUP_COSINE,
              "hole_ratio": list(HOLE_RATIO)}
    if first_files is not None:
        params["first_files"] = first_files
    return {"format": FORMAT, "source": source_fingerprint(source, names), "params": params}


def same_dataset(a: dict, b: dict) -> bool:
    """Whether two identities (or manifests holding one) describe the same dataset."""
    def key(m: dict) -> tuple:
        return m.get("format"), m.get("source", {}).get("sha256"), m.get("params")
    return key(a) == key(b)


@dataclass
class CatFaces:
    """One dataset in memory: uint8 images [N,64,64,3] per split (in the order of the lab's file names), the
    test holes bool [N_test,64,64] (True = hole) and the counts that dataset.json records."""
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    test_holes: np.ndarray
    counts: dict


def split_dataset(source: Path, names: list[str], seed: int, test_size: int, val_fraction: float) -> CatFaces:
    """Decode `names` of `source`, drop exact copies, group near-copies, split whole groups and draw one stroke hole
    per test image, all from `seed`; DatasetError for bad images or flags."""
    images = load_images(source, names)
    keep = first_copies(images)
    images = images[keep]
    labels = near_duplicate_groups(images)
    sizes = np.bincount(labels)
    split_rng, mask_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    split = split_groups(labels, test_size, val_fraction, split_rng)
    test = images[split["test"]]
    holes = np.stack([stroke_mask(mask_rng) for _ in range(len(test))])
    counts = {"source_files": len(names), "exact_duplicates_dropped": len(names) - len(keep), "distinct": len(keep),
              "near_dup_groups": int((sizes > 1).sum()), "near_dup_images": int(sizes[sizes > 1].sum()),
              **{k: len(v) for k, v in split.items()}}
    return CatFaces(images[split["train"]], images[split["val"]], test, holes, counts)
