"""experiments.py on a tiny MaskGIT and six smooth synthetic test images: one CSV/Markdown row per setting plus the
reference rows, the reference inpaintings themselves, the decoding figure, --resume and one-line flag errors.

FID uses the 64-d Inception features (the network's stem) so that every row costs a fraction of a second on CPU.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_maskgit import (brush_masks, make_tiny_setup, one_line_error, random_transformer_checkpoint,
                          write_masked_test_set)

import experiments
from models.VQGAN_Transformer import MaskGit, load_maskgit_config
from sampler.visualize import TILE_PAD
from utils.data import InpaintingTestSet
from utils.image import save_png
from utils.masks import fixed_holes

N_TEST = 6
SCHEDULES, TS, FLAGS, DECODINGS = ["cosine", "linear"], [1, 2], ["T", "0.5"], ["sample", "argmax"]


@pytest.fixture(scope="module", autouse=True)
def no_fid_cache():
    """Keep the FID tool's on-disk feature cache out of the home folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FID_CACHE_DIR", "")
        yield


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Tiny configs and weights, plus masked_image/, mask64/ and test_gt.csv of smooth images with brush holes."""
    root = tmp_path_factory.mktemp("lab")
    setup = make_tiny_setup(root, n_train=1, n_val=1)
    ckpt = random_transformer_checkpoint(root)
    coarse = torch.rand(N_TEST, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    smooth = F.interpolate(coarse, size=(64, 64), mode="bicubic", align_corners=False)
    gt = (255 * smooth).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    known = brush_masks(N_TEST, seed=2)[:, 0].numpy()
    data = root / "cat_face"
    write_masked_test_set(data, gt, known)
    return setup, ckpt, data, gt, known


def flags(lab, out: Path, *extra: str) -> list[str]:
    setup, ckpt, data, _, _ = lab
    return ["--device", "cpu", "--MaskGitConfig", str(setup.maskgit_config), "--load-transformer-ckpt-path", str(ckpt),
            "--test-maskedimage-path", str(data / "masked_image"), "--test-mask-path", str(data / "mask64"),
            "--output-dir", str(out), "--batch-size", "4", "--dims", "64", "--figure-images", "0", *extra]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def by_setting(rows: list[dict[str, str]]) -> dict[tuple[str, ...], dict[str, str]]:
    return {(r["schedule"], r["T"], r["sweet_spot_flag"], r["decoding"]): r for r in rows if r["method"] == "maskgit"}


@pytest.fixture(scope="module")
def sweep(lab, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    experiments.main(flags(lab, out, "--mask-funcs", *SCHEDULES, "--total-iters", *map(str, TS), "--sweet-spots", *FLAGS,
                           "--decodings", *DECODINGS, "--figure-images", "2"))
    return out, read_csv(out / "results.csv")


def test_one_row_per_setting_plus_references(sweep):
    out, rows = sweep
    refs = len(experiments.REFERENCES)
    assert len(rows) == refs + len(SCHEDULES) * len(TS) * len(FLAGS) * len(DECODINGS)
    assert [r["method"] for r in rows[:refs]] == list(experiments.REFERENCES)
    settings = by_setting(rows)
    assert set(settings) == {(s, str(t), f, d) for s in SCHEDULES for t in TS for f in FLAGS for d in DECODINGS}
    # sweet spot 0.5 is round(0.5 * T) half up, at least 1
    assert {(k[1], k[2]): r["sweet_spot"] for k, r in settings.items()} == {
        ("1", "T"): "1", ("1", "0.5"): "1", ("2", "T"): "2", ("2", "0.5"): "1"}
    assert all(math.isfinite(float(r["fid"])) and float(r["fid"]) > 0 and r["images"] == str(N_TEST)
               and r["split"] == "test" for r in rows)
    fid = {r["method"]: float(r["fid"]) for r in rows[:refs]}
    # gray holes are far from smooth images; Telea and the diffusion fill fill them smoothly
    assert fid["masked_input"] > max(fid["telea"], fid["diffusion_fill"])
    for s in SCHEDULES:
        for d in DECODINGS:
            # every setting re-seeds its generator: T=1 decoded to step 1 twice gives the same images, the same FID
            assert settings[s, "1", "T", d]["fid"] == settings[s, "1", "0.5", d]["fid"]
        assert settings[s, "2", "T", "sample"]["fid"] != settings[s, "2", "T", "argmax"]["fid"]

    table = (out / "results.md").read_text().splitlines()
    body = [line for line in table if line.startswith("| ") and not line.startswith(("| schedule", "| ---"))]
    assert len(body) == len(rows)
    assert body[0].startswith("| OpenCV Telea (radius 3) | - | - | - | ")
    for name in ("fid_vs_T.png", "decoding_figure.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and min(im.size) > 100


def test_reference_inpaintings(lab):
    setup, _, data, gt, known = lab
    dataset = InpaintingTestSet(data / "masked_image", data / "mask64")
    masked = dataset.images
    telea = experiments.telea_inpaint(masked, known)
    assert np.array_equal(telea[known], masked[known])  # known pixels exactly unchanged
    assert (telea[~known] != 128).any(axis=-1).mean() > 0.9  # the gray holes are filled
    model = MaskGit(load_maskgit_config(setup.maskgit_config)).eval()
    oracle = experiments.oracle_inpaint(model, gt, masked, known, batch_size=4, device=torch.device("cpu"))
    assert oracle.shape == gt.shape and oracle.dtype == np.uint8
    assert np.array_equal(oracle[known], gt[known])  # paste-back: the ground truth on known pixels
    assert not np.array_equal(oracle[~known], masked[~known])
    filled = experiments.diffusion_fill(masked, known)
    assert np.array_equal(filled[known], masked[known]) and (filled[~known] != 128).any(axis=-1).mean() > 0.9
    for images in (experiments.fill_tokens_inpaint(model, masked, known, 4, torch.device("cpu")),
                   experiments.oracle_inpaint(model, gt, masked, known, 4, torch.device("cpu"), seam_blend=True)):
        assert np.array_equal(images[known], masked[known])
    # the blend changes only hole pixels, and moves them towards the ground truth of this smooth data
    blended = experiments.oracle_inpaint(model, gt, masked, known, 4, torch.device("cpu"), seam_blend=True)
    error = lambda x: np.abs(x[~known].astype(int) - gt[~known]).mean()  # noqa: E731
    assert error(blended) < error(oracle)


def test_faces_mosaic_is_masked_input_fill_and_truth_side_by_side(lab, tmp_path):
    setup, ckpt, data, gt, known = lab
    model = MaskGit(load_maskgit_config(setup.maskgit_config)).eval()
    model.load_transformer_checkpoint(ckpt)
    dataset = InpaintingTestSet(data / "masked_image", data / "mask64")
    count, tile = 3, 64 + 2 * TILE_PAD
    mosaic, rows, cols = experiments.faces_mosaic(model, dataset, gt, count, experiments.Setting("cosine", 2, "T",
                                                                                                  "argmax"),
                                                  0, torch.device("cpu"))
    assert mosaic.shape == (3 * tile, count * tile, 3) and rows == ["masked input", "our fill", "truth"]
    assert cols == [dataset.names[i] for i in range(count)]
    for i in range(count):
        at = lambda r: mosaic[r * tile + TILE_PAD:(r + 1) * tile - TILE_PAD,  # noqa: E731
                              i * tile + TILE_PAD:(i + 1) * tile - TILE_PAD]
        assert np.array_equal(at(0), dataset.images[i]) and np.array_equal(at(2), gt[i])
        assert np.array_equal(at(1)[known[i]], gt[i][known[i]])  # known pixels pasted back
        assert not (at(1)[~known[i]] == 128).all()  # the hole is filled, not left gray
    experiments.main(flags(lab, tmp_path, "--references", "--mask-funcs", "cosine", "--total-iters", "2",
                           "--decodings", "argmax", "--faces", "2"))
    assert (tmp_path / "faces.png").is_file()


def test_decoding_mosaic_shows_every_step(lab):
    setup, ckpt, data, gt, known = lab
    model = MaskGit(load_maskgit_config(setup.maskgit_config)).eval()
    model.load_transformer_checkpoint(ckpt)
    dataset = InpaintingTestSet(data / "masked_image", data / "mask64")
    t, count, tile = 3, 2, 64 + 2 * TILE_PAD
    setting = experiments.Setting("cosine", t, "T", "sample")
    mosaic, rows, cols = experiments.decoding_mosaic(model, dataset, gt, count, SCHEDULES, setting, 0,
                                                     torch.device("cpu"))
    assert mosaic.shape == (count * len(SCHEDULES) * tile, (2 + 2 * t) * tile, 3)
    assert len(rows) == count * len(SCHEDULES) and len(cols) == 2 + 2 * t and cols[1:3] == ["mask 1", "step 1"]

    def tile_at(r: int, c: int) -> np.ndarray:
        return mosaic[r * tile + TILE_PAD:(r + 1) * tile - TILE_PAD, c * tile + TILE_PAD:(c + 1) * tile - TILE_PAD]

    for r in range(len(rows)):
        i = r // len(SCHEDULES)  # image-major
        assert np.array_equal(tile_at(r, 0), dataset.images[i])
        assert (tile_at(r, 2 * t - 1) == 255).all()  # nothing is masked after the last step
        assert np.array_equal(tile_at(r, 2 * t)[known[i]], gt[i][known[i]])  # the last step keeps known pixels
        assert np.array_equal(tile_at(r, 2 * t + 1), gt[i])
    white = [(tile_at(0, 2 * s + 1)[..., 0] == 255) for s in range(t)]  # latent masks of image 0, cosine
    known_tokens = np.kron(known[0].reshape(16, 4, 16, 4).all(axis=(1, 3)), np.ones((4, 4), dtype=bool))
    assert white[0][known_tokens].all() and white[0].mean() < 1  # known tokens stay known; holes fill step by step
    assert all((a <= b).all() for a, b in zip(white, white[1:]))  # a fixed token is never masked again


def test_only_references_then_resume_skips_done_rows(lab, sweep, tmp_path, capsys):
    experiments.main(flags(lab, tmp_path, "--only-references", "--load-transformer-ckpt-path", "/nonexistent/t.pt"))
    first = read_csv(tmp_path / "results.csv")
    assert [r["method"] for r in first] == list(experiments.REFERENCES)
    assert not (tmp_path / "decoding_figure.png").exists()
    experiments.main(flags(lab, tmp_path, "--resume", "--mask-funcs", "linear", "--total-iters", "2",
                           "--decodings", "sample"))
    rows = read_csv(tmp_path / "results.csv")
    refs = len(first)
    assert rows[:refs] == first  # not recomputed: the timings would differ
    assert len(rows) == refs + 1
    # the resumed row equals the same setting measured inside the full sweep
    assert rows[refs]["fid"] == by_setting(sweep[1])["linear", "2", "T", "sample"]["fid"]
    assert "--partial" in one_line_error(experiments.main, flags(lab, tmp_path, "--resume", "--partial", "0.5"), capsys)


def test_resume_reads_a_results_csv_from_before_the_later_columns(lab, sweep, tmp_path):
    """A results.csv written before those columns existed: confidence ordering, temperature 1, choice temperature
    4.5, stroke holes."""
    legacy = [{k: v for k, v in r.items() if k not in experiments.LATER_FIELDS} for r in sweep[1]]
    with open(tmp_path / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, [k for k in experiments.FIELDS if k not in experiments.LATER_FIELDS])
        writer.writeheader()
        writer.writerows(legacy)
    experiments.main(flags(lab, tmp_path, "--resume", "--references", "--mask-funcs", "linear", "--total-iters", "2",
                           "--decodings", "sample", "--orderings", "confidence", "halton"))
    rows = read_csv(tmp_path / "results.csv")
    assert list(rows[0]) == experiments.FIELDS  # rewritten in today's columns, then one row appended
    assert rows[:-1] == [{**r, "ordering": "confidence" if r["method"] == "maskgit" else "", "holes": "strokes",
                          **({"temperature": "1", "choice_temperature": "4.5"} if r["method"] == "maskgit"
                             else {"temperature": "", "choice_temperature": ""})} for r in legacy]
    new = rows[-1]
    assert (new["schedule"], new["T"], new["decoding"], new["ordering"]) == ("linear", "2", "sample", "halton")
    assert new["fid"] != by_setting(sweep[1])["linear", "2", "T", "sample"]["fid"]
    assert "| halton |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--mask-funcs", "zigzag"], "--mask-funcs"),
    (["--decodings", "greedy"], "--decodings"),
    (["--total-iters", "4", "0"], "--total-iters"),
    (["--total-iters", "2", "4", "--sweet-spots", "3"], "--sweet-spots"),
    (["--sweet-spots", "1.5"], "--sweet-spots"),
    (["--sweet-spots", "half"], "--sweet-spots"),
    (["--test-mask-path", "/nonexistent/mask64"], "--test-mask-path"),
    (["--gt", "/nonexistent/gt.csv"], "--gt"),
    (["--partial", "0.1"], "--partial"),
    (["--pixel-guidances", "-1"], "--pixel-guidances"),
    (["--seam-blends", "maybe"], "--seam-blends"),
    (["--orderings", "random"], "--orderings"),
    (["--temperatures", "hot"], "--temperatures"),
    (["--temperatures", "1.5:0"], "--temperatures"),
    (["--temperatures", "1:2:3"], "--temperatures"),
    (["--choice-temperatures", "-1"], "--choice-temperatures"),
    (["--split", "val", "--val_d_path", "/nonexistent/val"], "/nonexistent/val"),
])
def test_bad_flags_exit_2_with_one_line(lab, tmp_path, capsys, extra, message):
    assert message in one_line_error(experiments.main, flags(lab, tmp_path, *extra), capsys)


def test_val_split_and_the_decoding_additions_are_rows_of_their_own(lab, tmp_path):
    setup, _, _, gt, _ = lab
    val = tmp_path / "val"
    val.mkdir()
    for i, image in enumerate(gt):
        save_png(image, val / f"image_{i:05d}.png")
    out = tmp_path / "out"
    experiments.main(flags(lab, out, "--split", "val", "--val_d_path", str(val), "--references", "telea",
                           "--mask-funcs", "cosine", "--total-iters", "2", "--decodings", "argmax",
                           "--pixel-guidances", "0", "3", "--seam-blends", "off", "on"))
    rows = read_csv(out / "results.csv")
    assert [r["method"] for r in rows] == ["telea"] + ["maskgit"] * 4
    assert all(r["split"] == "val" and r["images"] == str(N_TEST) for r in rows)
    assert {(r["pixel_guidance"], r["seam_blend"]) for r in rows[1:]} == {
        ("0.0", "off"), ("0.0", "on"), ("3.0", "off"), ("3.0", "on")}
    assert len({r["fid"] for r in rows[1:]}) == 4
    assert f"FID on {N_TEST} val images" in (out / "results.md").read_text()
    # the val holes are drawn from a fixed seed: the same masks every run, unlike the test set's
    a = InpaintingTestSet.with_holes(gt, ["a"] * len(gt), fixed_holes("stroke", len(gt)))
    b = InpaintingTestSet.with_holes(gt, ["a"] * len(gt), fixed_holes("stroke", len(gt)))
    assert np.array_equal(a.known, b.known) and 0.05 < (~a.known).mean() < 0.45
    assert np.array_equal(a.images[a.known], gt[a.known]) and (a.images[~a.known] == 128).all()


def test_temperatures_and_choice_temperatures_are_rows_of_their_own(lab, tmp_path):
    """Constant and annealed temperatures and choice temperatures each get a row; "1.0" and "1" are one setting."""
    experiments.main(flags(lab, tmp_path, "--references", "--mask-funcs", "cosine", "--total-iters", "3",
                           "--decodings", "sample", "--temperatures", "1.0", "1", "3:0.2",
                           "--choice-temperatures", "0", "4.5"))
    rows = read_csv(tmp_path / "results.csv")
    assert {(r["temperature"], r["choice_temperature"]) for r in rows} == {
        ("1", "0.0"), ("1", "4.5"), ("3:0.2", "0.0"), ("3:0.2", "4.5")}
    assert len(rows) == 4 and len({r["fid"] for r in rows}) == 4
    assert "| 3:0.2 | 4.5 |" in (tmp_path / "results.md").read_text()


def test_box_holes_are_a_benchmark_of_their_own(lab, tmp_path, capsys):
    """--holes boxes scores the test ground truth with the test split's fixed boxes (not the prepared strokes); its
    rows say so, and resuming them with the other hole kind is refused."""
    _, _, _, gt, known = lab
    out = tmp_path / "boxes"
    experiments.main(flags(lab, out, "--holes", "boxes", "--references", "masked_input", "oracle",
                           "--mask-funcs", "cosine", "--total-iters", "2", "--decodings", "argmax"))
    rows = read_csv(out / "results.csv")
    assert [r["holes"] for r in rows] == ["boxes"] * 3
    assert "with boxes holes" in (out / "results.md").read_text()
    strokes = tmp_path / "strokes"
    experiments.main(flags(lab, strokes, "--references", "masked_input"))
    assert float(read_csv(strokes / "results.csv")[0]["fid"]) != float(rows[0]["fid"])
    boxes = ~fixed_holes("box", len(gt), "test")
    assert not np.array_equal(boxes, known)
    dataset, _ = experiments.test_set(experiments.parse_args(flags(lab, out, "--holes", "boxes")))
    assert np.array_equal(dataset.known, boxes) and np.array_equal(dataset.images[boxes], gt[boxes])
    assert "--holes" in one_line_error(experiments.main, flags(lab, out, "--resume", "--holes", "strokes"), capsys)
