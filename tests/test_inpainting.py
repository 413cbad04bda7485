"""inpainting.py end to end on a tiny synthetic test set, and its one-line flag errors."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import yaml
from tiny_maskgit import (REPO, brush_masks, make_tiny_setup, one_line_error, random_transformer_checkpoint,
                          write_masked_test_set)

import inpainting
from sampler.visualize import TILE_PAD
from utils.image import read_rgb

N_TEST, T = 5, 4


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Tiny configs and weights plus cat_face/{masked_image,mask64,test_gt.csv}: image 3 has no hole, 4 is all hole."""
    root = tmp_path_factory.mktemp("lab")
    setup = make_tiny_setup(root)
    ckpt = random_transformer_checkpoint(root)
    rng = np.random.default_rng(0)
    gt = np.kron(rng.integers(0, 256, (N_TEST, 8, 8, 3), dtype=np.uint8), np.ones((1, 8, 8, 1), dtype=np.uint8))
    known = brush_masks(N_TEST, seed=2)[:, 0].numpy()
    known[3], known[4] = True, False
    data = root / "cat_face"
    write_masked_test_set(data, gt, known)
    return setup, ckpt, data, known


def flags(lab, out, *extra: str) -> list[str]:
    setup, ckpt, data, _ = lab
    return ["--device", "cpu", "--MaskGitConfig", str(setup.maskgit_config), "--load-transformer-ckpt-path", str(ckpt),
            "--test-maskedimage-path", str(data / "masked_image"), "--test-mask-path", str(data / "mask64"),
            "--output-dir", str(out), "--total-iter", str(T), "--batch-size", "2", "--num_workers", "0", *extra]


def test_end_to_end_writes_the_lab_folders_and_prints_fid(lab, tmp_path, capsys):
    _, _, data, known = lab
    inpainting.main(flags(lab, tmp_path, "--visualize", "3"))
    out = capsys.readouterr().out
    assert re.search(r"^FID:  \d+\.\d+", out, re.M), out
    results = sorted(p.name for p in (tmp_path / "test_results").iterdir())
    assert results == [f"image_{i:03d}.png" for i in range(N_TEST)]
    for folder in ("mask_scheduling", "imga"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == [f"test_{i}.png" for i in range(3)]
    tile = 64 + 2 * TILE_PAD
    assert read_rgb(tmp_path / "imga" / "test_0.png", size=None).shape == (tile, (T + 1) * tile, 3)
    masks = read_rgb(tmp_path / "mask_scheduling" / "test_0.png", size=None)
    assert masks.shape == (tile, T * tile, 3)
    last = masks[2:-2, -tile + 2:-2]
    assert (last == 255).all()  # nothing is masked after the last step
    for i in range(N_TEST):
        masked = read_rgb(data / "masked_image" / f"image_{i:03d}.png")
        result = read_rgb(tmp_path / "test_results" / f"image_{i:03d}.png")
        assert np.array_equal(result[known[i]], masked[known[i]])  # paste-back is exact
    assert np.array_equal(read_rgb(tmp_path / "test_results" / "image_003.png"),
                          read_rgb(data / "masked_image" / "image_003.png"))  # no hole: output = input
    # the all-hole image 4 is generated from nothing: not the gray input
    assert (read_rgb(tmp_path / "test_results" / "image_004.png") != 128).any()


def test_seed_sweet_spot_and_no_paste_back(lab, tmp_path, capsys):
    runs = {}
    for name, extra in (("a", []), ("b", []), ("s", ["--sweet-spot", "1"]), ("raw", ["--no-paste-back"])):
        inpainting.main(flags(lab, tmp_path / name, "--no-fid", "--visualize", "1", "--seed", "3", *extra))
        runs[name] = [read_rgb(tmp_path / name / "test_results" / f"image_{i:03d}.png") for i in range(N_TEST)]
    assert "FID" not in capsys.readouterr().out
    assert all(np.array_equal(a, b) for a, b in zip(runs["a"], runs["b"]))
    assert not all(np.array_equal(a, s) for a, s in zip(runs["a"], runs["s"]))
    assert not np.array_equal(runs["raw"][3], runs["a"][3])  # the raw decode of random weights is not the input
    strip = read_rgb(tmp_path / "s" / "mask_scheduling" / "test_0.png", size=None)
    assert strip.shape[1] == 64 + 2 * TILE_PAD  # one step ran


@pytest.mark.parametrize("extra, message", [
    (["--mask-func", "zigzag"], "--mask-func"),
    (["--sweet-spot", "9"], "--sweet-spot"),
    (["--total-iter", "0"], "--total-iter"),
    (["--partial", "0"], "--partial"),
    (["--test-mask-path", "/nonexistent/mask64"], "--test-mask-path"),
    (["--load-transformer-ckpt-path", "/nonexistent/t.pt"], "/nonexistent/t.pt"),
    (["--gt", "/nonexistent/gt.csv"], "--gt"),
    (["--pixel-guidance", "-1"], "--pixel-guidance"),
    (["--seam-blend", "--no-paste-back"], "--seam-blend"),
    (["--ordering", "random"], "--ordering"),
])
def test_bad_input_exits_2_with_one_line(lab, tmp_path, capsys, extra, message):
    assert message in one_line_error(inpainting.main, flags(lab, tmp_path, *extra), capsys)


def test_script_exit_status_and_message(lab, tmp_path):
    run = subprocess.run([sys.executable, "inpainting.py", *flags(lab, tmp_path, "--total-iter", "4", "--sweet-spot", "5")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--sweet-spot" in run.stderr, run.stderr


def test_the_config_sets_the_decoding_additions_and_flags_override_it(lab, tmp_path, capsys):
    setup, _, data, known = lab
    cfg = yaml.safe_load(setup.maskgit_config.read_text())
    cfg["model_param"].update(pixel_guidance=3.0, seam_blend=True, decoding="argmax", ordering="halton")
    config = tmp_path / "guided.yml"
    config.write_text(yaml.safe_dump(cfg))
    runs = {}
    for name, extra in (("config", ["--MaskGitConfig", str(config)]),
                        ("flags", ["--pixel-guidance", "3", "--seam-blend", "--decoding", "argmax", "--ordering",
                                   "halton"]),
                        ("off", ["--MaskGitConfig", str(config), "--pixel-guidance", "0", "--no-seam-blend",
                                 "--ordering", "confidence"]),
                        ("lab", ["--decoding", "argmax"]),
                        ("halton", ["--decoding", "argmax", "--ordering", "halton"])):
        inpainting.main(flags(lab, tmp_path / name, "--no-fid", "--visualize", "0", *extra))
        runs[name] = [read_rgb(tmp_path / name / "test_results" / f"image_{i:03d}.png") for i in range(N_TEST)]
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(runs[a], runs[b]))  # noqa: E731
    assert same("config", "flags") and same("off", "lab") and not same("config", "lab")
    assert not same("halton", "lab")
    for i in range(N_TEST):
        assert np.array_equal(runs["config"][i][known[i]], read_rgb(data / "masked_image" / f"image_{i:03d}.png")[known[i]])
    for key, value in (("pixel_guidance", "strong"), ("seam_blend", "yes"), ("ordering", "random"),
                       ("temperature", 0), ("final_temperature", "hot")):
        bad = yaml.safe_load(config.read_text())
        bad["model_param"][key] = value
        config.write_text(yaml.safe_dump(bad))
        assert key in one_line_error(inpainting.main, flags(lab, tmp_path / "bad", "--MaskGitConfig", str(config)), capsys)
        config.write_text(yaml.safe_dump(cfg))


def test_the_config_sets_an_annealed_temperature_and_flags_override_it(lab, tmp_path):
    setup, _, _, _ = lab
    cfg = yaml.safe_load(setup.maskgit_config.read_text())
    cfg["model_param"].update(decoding="sample", temperature=3.0, final_temperature=0.5)
    config = tmp_path / "annealed.yml"
    config.write_text(yaml.safe_dump(cfg))
    runs = {}
    for name, extra in (("config", ["--MaskGitConfig", str(config)]),
                        ("flags", ["--temperature", "3", "--final-temperature", "0.5"]),
                        ("constant", ["--MaskGitConfig", str(config), "--final-temperature", "3"]),
                        ("hot", ["--temperature", "3"])):
        inpainting.main(flags(lab, tmp_path / name, "--no-fid", "--visualize", "0", *extra))
        runs[name] = [read_rgb(tmp_path / name / "test_results" / f"image_{i:03d}.png") for i in range(N_TEST)]
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(runs[a], runs[b]))  # noqa: E731
    assert same("config", "flags") and same("constant", "hot") and not same("config", "hot")
