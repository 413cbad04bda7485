"""FID tool: distance vs SciPy and vs the exact low-rank value, csv == folder ground truth, known
properties, the hand-written pytorch-fid network, and one-line errors.

Real Inception features of small synthetic images keep this fast on CPU: 192-d features (the
network's stem) where only the distance is under test, 2048-d (the whole network) end to end.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
FID_DIR = ROOT / "faster-pytorch-fid"
sys.path.insert(0, str(FID_DIR))

import fid_core as fc  # noqa: E402
import fid_score_gpu  # noqa: E402
from fid_inception import PTInception  # noqa: E402

N = 8  # images per set: enough for a covariance, few enough for a CPU


def smooth_images(n: int, seed: int, shift: int = 0) -> np.ndarray:
    """uint8 [n,64,64,3] images with natural-ish structure: upsampled coarse noise plus fine texture."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=g)
    x = F.interpolate(coarse, size=(64, 64), mode="bicubic", align_corners=False)
    x = 255 * x + 20 * torch.randn(n, 3, 64, 64, generator=g) + shift
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_folder(images: np.ndarray, folder: Path) -> Path:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"image_{i:03d}.png")
    return folder


def write_csv(images: np.ndarray, path: Path) -> Path:
    rows = images.reshape(len(images), -1)
    header = ",".join(str(i) for i in range(rows.shape[1]))
    np.savetxt(path, rows, fmt="%d", delimiter=",", header=header, comments="")
    return path


def exact_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID from features without any matrix square root: with centred features C1, C2,
    tr sqrt(S1 S2) = nuclear norm of C1 C2^T / sqrt((n1-1)(n2-1)) (exact, small SVD)."""
    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    c1, c2 = f1 - f1.mean(0), f2 - f2.mean(0)
    n1, n2 = len(f1) - 1, len(f2) - 1
    tr = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / np.sqrt(n1 * n2)
    d = f1.mean(0) - f2.mean(0)
    return float(d @ d + (c1 * c1).sum() / n1 + (c2 * c2).sum() / n2 - 2 * tr)


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("fid")
    a, b = smooth_images(N, 0), smooth_images(N, 1)
    return SimpleNamespace(a=a, b=b, shifted=smooth_images(N, 0, shift=60),
                           a_dir=write_folder(a, d / "a"), b_dir=write_folder(b, d / "b"),
                           b_csv=write_csv(b, d / "b.csv"))


@pytest.fixture(scope="module")
def stem(sets) -> SimpleNamespace:
    """192-d real Inception features (pytorch-fid's second block) of the three sets."""
    model = fc.load_inception(device="cpu", dims=192)
    feats = {k: fc.compute_features(getattr(sets, k), model, progress=False) for k in ("a", "b", "shifted")}
    return SimpleNamespace(feats=feats, stats={k: fc.statistics_from_features(f) for k, f in feats.items()})


def test_distance_matches_scipy_and_exact_value(stem):
    (m1, s1), (m2, s2) = stem.stats["a"], stem.stats["b"]
    ours = fc.frechet_distance(m1, s1, m2, s2)
    scipy_value = fc.frechet_distance_scipy(m1, s1, m2, s2)
    exact = exact_fid(stem.feats["a"], stem.feats["b"])
    assert abs(ours - scipy_value) / scipy_value < 1e-6
    assert abs(ours - exact) / exact < 1e-8  # no sqrtm round-off: closer to the truth than SciPy
    assert abs(fc.frechet_distance(m2, s2, m1, s1) - ours) / ours < 1e-8  # symmetric, though computed asymmetrically


def test_known_properties(stem):
    (m, s), (ms, ss) = stem.stats["a"], stem.stats["shifted"]
    self_fid = fc.frechet_distance(m, s, m, s)
    assert abs(self_fid) < 1e-9 * np.trace(s)
    assert fc.frechet_distance(m, s, ms, ss) > 1.0
    # The distance grows with a pure mean shift, by exactly ||shift||^2.
    shift = np.full_like(m, 0.5)
    assert fc.frechet_distance(m + shift, s, m, s) == pytest.approx(shift @ shift, rel=1e-9)


def test_cli_csv_and_folder_ground_truth_agree(sets, tmp_path):
    """End to end at 2048-d: the script with the lab csv gives the in-process value from folders."""
    model = fc.load_inception(device="cpu")
    fa = fc.compute_features(fc.image_source(sets.a_dir), model, progress=False)
    fb = fc.compute_features(fc.image_source(sets.b_dir), model, progress=False)
    expected = fc.frechet_distance(*fc.statistics_from_features(fa), *fc.statistics_from_features(fb))
    assert abs(expected - exact_fid(fa, fb)) / expected < 1e-8
    env = dict(os.environ, OMP_NUM_THREADS="1", FID_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "fid_score_gpu.py", "--predicted-path", str(sets.a_dir),
                          "--gtcsv-path", str(sets.b_csv), "--device", "cpu", "--save-stats", str(tmp_path / "a")],
                         cwd=FID_DIR, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("FID:  ")
    assert float(last.split()[-1]) == pytest.approx(expected, rel=1e-6)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1  # ground-truth features kept for next time
    with np.load(tmp_path / "a.npz") as saved:
        # features differ by ~5e-7 between thread counts (oneDNN reduction order): the subprocess runs 1 thread
        np.testing.assert_allclose(saved["mu"], fa.astype(np.float64).mean(0), rtol=1e-5, atol=1e-5)


def test_folder_and_csv_load_identical_pixels(sets):
    np.testing.assert_array_equal(fc.read_csv_images(sets.b_csv), sets.b)
    folder = fc.image_source(sets.b_dir)
    np.testing.assert_array_equal(fc.load_images(folder), sets.b)


def test_handwritten_pytorch_fid_network_matches_torchscript(sets, tmp_path):
    """pytorch-fid's .pth layout, filled with the TorchScript network's weights, computes the same features."""
    ts = fc.load_inception(weights=fc.torchscript_default(), device="cpu")
    ts_convs = [m for m in ts.stages.modules() if hasattr(m, "beta")]
    pt = PTInception()
    names = [n for n, m in pt.named_modules() if type(m).__name__ == "BasicConv2d"]
    assert len(names) == len(ts_convs) == 94
    state = {"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    for name, conv in zip(names, ts_convs):
        state[f"{name}.conv.weight"] = conv.weight.detach().clone()
        state[f"{name}.bn.weight"] = torch.ones_like(conv.beta)
        state[f"{name}.bn.bias"] = conv.beta.detach().clone()
        state[f"{name}.bn.running_mean"] = conv.mean.detach().clone()
        state[f"{name}.bn.running_var"] = conv.var.detach().clone()
        state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    pth = tmp_path / fc.PT_INCEPTION_FILE
    torch.save(state, pth)
    handwritten = fc.load_inception(weights=pth, device="cpu")
    x = sets.a[:2]
    np.testing.assert_allclose(fc.compute_features(x, handwritten, progress=False),
                               fc.compute_features(x, ts, progress=False), rtol=0, atol=2e-5)


def _run(argv, capsys) -> tuple[int, list[str]]:
    code = fid_score_gpu.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_bad_inputs_exit_2_with_one_line(sets, tmp_path, capsys):
    one = write_folder(sets.a[:1], tmp_path / "one")
    mixed = write_folder(sets.a[:2], tmp_path / "mixed")
    from PIL import Image
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(mixed / "image_999.png")
    wide = tmp_path / "wide.csv"
    np.savetxt(wide, np.zeros((3, 100)), fmt="%d", delimiter=",", header="h", comments="")
    cases = [
        (["--predicted-path", str(tmp_path / "missing")], "no such folder"),
        (["--predicted-path", str(one / "image_000.png")], "expected a folder of images"),
        (["--predicted-path", str(one), "--gt-path", str(sets.b_dir)], "at least 2"),
        (["--predicted-path", str(mixed), "--gt-path", str(sets.b_dir)], "different sizes"),
        (["--predicted-path", str(sets.a_dir), "--gtcsv-path", str(wide)], "expected 12288"),
        (["--predicted-path", str(sets.a_dir), "--gtcsv-path", str(tmp_path / "nope.csv")], "no such ground truth"),
        (["--predicted-path", str(sets.a_dir), "--gt-path", str(sets.b_dir), "--weights", str(wide)], "--weights"),
    ]
    for argv, needle in cases:
        code, lines = _run(argv + ["--device", "cpu"], capsys)
        assert code == 2 and len(lines) == 1, (argv, lines)
        assert lines[0].startswith("error: ") and needle in lines[0], (argv, lines)


def test_feature_cache_survives_damage_and_unwritable_folder(sets, tmp_path, monkeypatch, capsys):
    """A damaged cache file is recomputed; a cache folder that cannot be made only costs a note."""
    monkeypatch.setenv("FID_CACHE_DIR", str(tmp_path / "cache"))
    first = fc.compute_statistics(sets.a, dims=192, cache=True, progress=False)
    (cached,) = (tmp_path / "cache").rglob("*.npy")
    cached.write_bytes(b"not a numpy file")
    again = fc.compute_statistics(sets.a, dims=192, cache=True, progress=False)
    assert np.allclose(first[0], again[0]) and "damaged feature cache" in capsys.readouterr().err
    assert np.load(cached).shape == (N, 192)  # rewritten whole
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("FID_CACHE_DIR", str(blocker / "cache"))
    third = fc.compute_statistics(sets.a, dims=192, cache=True, progress=False)
    assert np.allclose(first[1], third[1]) and "feature cache not written" in capsys.readouterr().err


def test_more_bad_inputs_and_interrupt(sets, tmp_path, capsys, monkeypatch):
    corrupt = write_folder(sets.a[:3], tmp_path / "corrupt")
    (corrupt / "image_001.png").write_bytes(b"\x89PNG truncated")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        (["--predicted-path", str(corrupt), "--gt-path", str(sets.b_dir)], "image_001.png"),
        (["--predicted-path", str(sets.a_dir), "--gt-path", str(sets.b_dir), "--weights", str(tmp_path / "no.pt")],
         "--weights"),
        (["--predicted-path", str(sets.a_dir), "--gt-path", str(sets.b_dir), "--save-stats",
          str(blocker / "stats.npz")], "stats"),
    ]
    for argv, needle in cases:
        code, lines = _run(argv + ["--device", "cpu", "--dims", "64"], capsys)
        assert code == 2 and len(lines) == 1 and needle in lines[0], (argv, lines)
    assert not list(tmp_path.rglob("stats.npz"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(fid_score_gpu, "fid_between", interrupted)
    code, lines = _run(["--predicted-path", str(sets.a_dir), "--gt-path", str(sets.b_dir), "--device", "cpu"], capsys)
    assert code == 130 and lines == ["interrupted"]


def test_cuda_asked_without_cuda_computes_on_the_cpu_with_one_note(sets, tmp_path, capsys, monkeypatch):
    """The lab's command says --device cuda:0; without CUDA it still gives the FID, and says so in one line."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("FID_CACHE_DIR", "")
    argv = ["--predicted-path", str(sets.a_dir), "--gt-path", str(sets.b_dir), "--dims", "64"]
    assert fid_score_gpu.main(argv + ["--device", "cuda:0"]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.startswith(("note:", "error:", "Traceback"))]
    assert len(notes) == 1 and "--device cuda:0: CUDA is not available" in notes[0] and "CPU" in notes[0], notes
    assert fid_score_gpu.main(argv + ["--device", "cpu"]) == 0
    on_cpu = capsys.readouterr()
    assert "note:" not in on_cpu.err and on_cpu.out == captured.out  # the same FID, computed on the CPU
