"""prepare_dataset.py on a tiny synthetic archive: leakage-free splits, lab mask semantics, csv, determinism,
and one-line errors that leave nothing half-written."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import prepare_dataset
from utils.fid import read_csv_images as read_gt_csv
from utils.image import HOLE_GRAY, read_rgb

REPO = Path(__file__).resolve().parents[1]
N_BASE, N_COPIES, N_SHIFTED, TEST_SIZE = 50, 6, 4, 8


def _smooth_image(rng: np.random.Generator) -> np.ndarray:
    """A photo-like image (smooth, so a 1-pixel shift keeps it recognisable), unlike white noise."""
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    big = np.asarray(small.resize((64, 64), Image.BICUBIC)).astype(np.int16)
    return np.clip(big + rng.integers(-3, 4, big.shape), 0, 255).astype(np.uint8)


def _encode(a: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, dict[bytes, int]]:
    """60 files: 50 distinct images (some JPEG, nested folders), 6 byte copies, 4 one-pixel shifts.

    Returns the zip and a map from the decoded pixels of every file to the id of its base image.
    """
    rng = np.random.default_rng(123)
    names = [f"cats/{i}.jpg" if i % 5 == 0 else f"cats/{i}.png" for i in range(N_BASE)]
    members = {n: _encode(_smooth_image(rng), "JPEG" if n.endswith(".jpg") else "PNG") for n in names}
    base_of = {n: i for i, n in enumerate(names)}
    for i in range(10, 10 + N_COPIES):  # byte-identical copies under other names
        copy = f"cats/copies/copy_of_{Path(names[i]).name}"
        members[copy], base_of[copy] = members[names[i]], i
    for i in range(21, 21 + N_SHIFTED):  # the same picture moved right by one pixel (edge column repeated)
        b = read_rgb(io.BytesIO(members[names[i]]))
        shifted = f"more/shift_of_{i}.png"
        members[shifted], base_of[shifted] = _encode(np.concatenate([b[:, :1], b[:, :-1]], axis=1), "PNG"), i
    owner = {read_rgb(io.BytesIO(members[n])).tobytes(): i for n, i in base_of.items()}
    members["cats/readme.txt"] = b"not an image"
    members["__MACOSX/cats/._1.png"] = b"resource fork"
    return _zip(tmp_path_factory.mktemp("src") / "cats.zip", members), owner


def _run(*args: str) -> int:
    return prepare_dataset.main([str(a) for a in args])


@pytest.fixture(scope="module")
def built(source, tmp_path_factory) -> dict[str, Path]:
    """The same archive built with seed 0 twice and with seed 1 once."""
    root = tmp_path_factory.mktemp("out")
    out = {"a": root / "a", "b": root / "b", "seed1": root / "seed1"}
    for key, seed in (("a", 0), ("b", 0), ("seed1", 1)):
        assert _run("--source", source[0], "--output", out[key], "--seed", seed, "--test-size", TEST_SIZE) == 0
    return out


def _pngs(folder: Path) -> list[np.ndarray]:
    return [read_rgb(f) for f in sorted(folder.glob("*.png"))]


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_counts_and_manifest(built):
    m = json.loads((built["a"] / "dataset.json").read_text())
    c = m["counts"]
    distinct = N_BASE + N_SHIFTED
    n_val = round(0.1 * (distinct - TEST_SIZE))
    assert (c["source_files"], c["exact_duplicates_dropped"], c["distinct"]) == (60, N_COPIES, distinct)
    assert (c["near_dup_groups"], c["near_dup_images"]) == (N_SHIFTED, 2 * N_SHIFTED)
    assert (c["test"], c["val"], c["train"]) == (TEST_SIZE, n_val, distinct - TEST_SIZE - n_val)
    for sub, n in (("train", c["train"]), ("val", c["val"]), ("test_gt", TEST_SIZE),
                   ("masked_image", TEST_SIZE), ("mask64", TEST_SIZE)):
        assert len(list((built["a"] / sub).glob("*.png"))) == n
    assert (built["a"] / "train" / "image_00000.png").is_file()
    assert (built["a"] / "mask64" / "mask_000.png").is_file()
    assert m["params"]["seed"] == 0 and m["source"]["name"] == "cats.zip"


def test_no_image_or_near_copy_in_two_splits(built, source):
    owner = source[1]
    splits_of_base, written = {}, set()
    for split in ("train", "val", "test_gt"):
        for img in _pngs(built["a"] / split):
            key = img.tobytes()
            assert key not in written, "an exact duplicate was written twice"
            assert key in owner, "a written image is not one of the source images"
            written.add(key)
            splits_of_base.setdefault(owner[key], set()).add(split)
    assert len(written) == N_BASE + N_SHIFTED  # every shifted copy is kept, only exact copies are dropped
    assert sorted(splits_of_base) == list(range(N_BASE))
    assert all(len(s) == 1 for s in splits_of_base.values()), splits_of_base


def test_masks_follow_lab_semantics(built):
    gts, masked = _pngs(built["a"] / "test_gt"), _pngs(built["a"] / "masked_image")
    for gt, img, f in zip(gts, masked, sorted((built["a"] / "mask64").glob("*.png"))):
        with Image.open(f) as im:
            assert im.mode == "L"
            mask = np.asarray(im)
        assert set(np.unique(mask)) <= {0, 255}
        hole = mask == 0
        assert 0.09 <= hole.mean() <= 0.41
        assert (img[hole] == HOLE_GRAY).all()
        assert (img[~hole] == gt[~hole]).all()


def test_csv_matches_test_gt_pngs(built):
    csv = built["a"] / "test_gt.csv"
    with open(csv) as f:
        assert len(f.readline().split(",")) == 64 * 64 * 3
    np.testing.assert_array_equal(read_gt_csv(csv), np.stack(_pngs(built["a"] / "test_gt")))


def test_same_seed_is_byte_identical_other_seed_differs(built):
    a, b, other = _tree(built["a"]), _tree(built["b"]), _tree(built["seed1"])
    assert a == b
    assert a.keys() == other.keys()
    assert a["mask64/mask_000.png"] != other["mask64/mask_000.png"]
    assert a["test_gt.csv"] != other["test_gt.csv"]


def test_same_dataset_is_up_to_date(built, source, capsys):
    before = _tree(built["b"])
    assert _run("--source", source[0], "--output", built["b"], "--test-size", TEST_SIZE) == 0
    assert "up to date" in capsys.readouterr().out
    assert _tree(built["b"]) == before


def test_other_dataset_needs_force(built, source, capsys):
    """Building seed 0 over the seed-1 folder is refused, then --force replaces it exactly."""
    out = built["seed1"]
    before = _tree(out)
    assert _run("--source", source[0], "--output", out, "--test-size", TEST_SIZE) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]
    assert _tree(out) == before
    assert _run("--source", source[0], "--output", out, "--test-size", TEST_SIZE, "--force") == 0
    assert _tree(out) == _tree(built["a"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["a", "b", "seed1"]  # no temporary leftovers


def _bad_sources(tmp: Path) -> dict[str, tuple[Path, str]]:
    """Bad input -> (source, a word the error line must contain)."""
    rng = np.random.default_rng(0)
    good = {f"cats/{i}.png": _encode(_smooth_image(rng), "PNG") for i in range(20)}
    return {
        "missing": (tmp / "nowhere.zip", "not found"),
        "not_a_zip": (tmp / "fake.zip", "zip"),
        "empty_zip": (_zip(tmp / "empty.zip", {}), "no .jpg/.png"),
        "no_images": (_zip(tmp / "text.zip", {"a.txt": b"x"}), "no .jpg/.png"),
        "unreadable": (_zip(tmp / "broken.zip", {**good, "cats/bad.jpg": b"\xff\xd8garbage"}), "cats/bad.jpg"),
        "wrong_size": (_zip(tmp / "big.zip", {**good, "cats/big.png": _encode(np.zeros((65, 64, 3), np.uint8),
                                                                               "PNG")}), "cats/big.png"),
        "too_few": (_zip(tmp / "few.zip", dict(list(good.items())[:5])), "--test-size"),
    }


@pytest.mark.parametrize("case", ["missing", "not_a_zip", "empty_zip", "no_images", "unreadable",
                                  "wrong_size", "too_few"])
def test_bad_input_exit_2_one_line_no_output(case, tmp_path, capsys):
    (tmp_path / "fake.zip").write_bytes(b"this is not a zip archive")
    src, word = _bad_sources(tmp_path)[case]
    out = tmp_path / "out" / "cat_face"
    out.parent.mkdir()
    assert _run("--source", src, "--output", out, "--test-size", TEST_SIZE) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and word in err[0], err
    assert list(out.parent.iterdir()) == []


def test_cli_error_has_no_traceback(tmp_path):
    """Through the real entry point: exit code 2 and one stderr line; with --debug the exception propagates."""
    src = _zip(tmp_path / "bad.zip", {"cats/1.png": _encode(np.zeros((32, 32, 3), np.uint8), "PNG")})
    args = ["--source", str(src), "--output", str(tmp_path / "o")]
    r = subprocess.run([sys.executable, str(REPO / "prepare_dataset.py"), *args], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 2
    expected = f"error: {src}/cats/1.png: image is 32x32, expected 64x64; resize it first"
    assert r.stderr.strip().splitlines() == [expected]
    with pytest.raises(prepare_dataset.DatasetError):
        _run(*args, "--debug")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]


def test_folder_source_matches_zip_content(source, built, tmp_path):
    """A folder with the same images (any nesting) gives the same split and masks as the zip."""
    with zipfile.ZipFile(source[0]) as zf:
        zf.extractall(tmp_path / "src")
    out = tmp_path / "out"
    assert _run("--source", tmp_path / "src", "--output", out, "--test-size", TEST_SIZE) == 0
    a, f = _tree(built["a"]), _tree(out)
    del a["dataset.json"], f["dataset.json"]  # the source fingerprint differs, the images do not
    assert a == f
