"""benchmarks/generalization_gap.py on the tiny setup: the same tokens read as the same loss on both sides, and a
transformer that has the train tokens by heart shows a train loss far below val."""
import re

import pytest
import torch
import yaml

from benchmarks import generalization_gap
from models.VQGAN_Transformer import MaskGit, load_maskgit_config
from tiny_maskgit import exit_code, make_tiny_setup, one_line_error

MEMORISED_CODE = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    setup = make_tiny_setup(tmp_path_factory.mktemp("tiny"))
    transformer = MaskGit(load_maskgit_config(setup.maskgit_config)).transformer
    with torch.no_grad():
        transformer.bias[:, MEMORISED_CODE] = 20.0  # predicts one code everywhere, whatever it sees
    torch.save(transformer.state_dict(), setup.root / "transformer.pt")
    return setup


def write_cache(path, train: torch.Tensor, val: torch.Tensor) -> str:
    torch.save({"train": train, "train_flip": train.flip(0), "val": val, "encoder_precision": "fp32"}, path)
    return str(path)


def rows(tiny, cache: str, capsys) -> dict[str, tuple[float, float, float]]:
    argv = ["--MaskGitConfig", str(tiny.maskgit_config), "--transformer", str(tiny.root / "transformer.pt"),
            "--token-cache", cache, "--batch-size", "4", "--amp", "none"]
    assert exit_code(generalization_gap.main, argv) == 0
    out = capsys.readouterr().out
    found = re.findall(r"^(uniform|whole holes) +([\d.]+) +([\d.]+) +(-?[\d.]+) ", out, re.M)
    assert [name for name, *_ in found] == ["uniform", "whole holes"]
    return {name: tuple(float(x) for x in numbers) for name, *numbers in found}


def random_tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 32, (n, 256), generator=torch.Generator().manual_seed(seed), dtype=torch.int16)


def test_the_same_tokens_on_both_sides_give_no_gap(tiny, tmp_path, capsys):
    tokens = random_tokens(1, seed=1).repeat(6, 1)  # one image six times: whichever train rows are drawn
    for val_loss, train_loss, gap in rows(tiny, write_cache(tmp_path / "c.pt", tokens, tokens), capsys).values():
        assert val_loss == pytest.approx(train_loss, abs=1e-4) and abs(gap) < 1e-3


def test_train_tokens_the_model_has_by_heart_read_far_below_val(tiny, tmp_path, capsys):
    train = torch.full((8, 256), MEMORISED_CODE, dtype=torch.int16)
    for val_loss, train_loss, gap in rows(tiny, write_cache(tmp_path / "c.pt", train, random_tokens(4, 2)),
                                          capsys).values():
        assert train_loss < 0.01 and gap > 10 and gap == pytest.approx(val_loss - train_loss, abs=1e-3)


def test_a_cache_with_fewer_train_than_val_images_is_one_line_and_exit_2(tiny, tmp_path, capsys):
    cache = write_cache(tmp_path / "c.pt", random_tokens(2, 1), random_tokens(4, 2))
    err = one_line_error(generalization_gap.main, ["--MaskGitConfig", str(tiny.maskgit_config), "--transformer",
                                                   str(tiny.root / "transformer.pt"), "--token-cache", cache], capsys)
    assert "--token-cache" in err


def test_a_transformer_with_pixel_conditioning_reads_the_images_beside_the_tokens(tiny, tmp_path, capsys):
    config = yaml.safe_load(tiny.maskgit_config.read_text())
    config["model_param"]["Transformer_param"]["pixel_conditioning"] = True
    (tmp_path / "pixels.yml").write_text(yaml.safe_dump(config))
    transformer = MaskGit(load_maskgit_config(tmp_path / "pixels.yml")).transformer
    torch.nn.init.normal_(transformer.pixel_emb.weight, 0, 0.5)  # the pixels move the logits
    torch.save(transformer.state_dict(), tmp_path / "transformer.pt")
    face = (tiny.train_dir / "image_00000.png").read_bytes()
    for split in ("train", "val"):  # one face six times on both sides, as its tokens are
        (tmp_path / split).mkdir()
        for i in range(6):
            (tmp_path / split / f"image_{i:05d}.png").write_bytes(face)
    tokens = random_tokens(1, seed=1).repeat(6, 1)
    argv = ["--MaskGitConfig", str(tmp_path / "pixels.yml"), "--transformer", str(tmp_path / "transformer.pt"),
            "--token-cache", write_cache(tmp_path / "c.pt", tokens, tokens), "--batch-size", "4", "--amp", "none",
            "--train_d_path", str(tmp_path / "train"), "--val_d_path", str(tmp_path / "val")]
    assert exit_code(generalization_gap.main, argv) == 0
    gaps = re.findall(r"^(?:uniform|whole holes) +[\d.]+ +[\d.]+ +(-?[\d.]+) ", capsys.readouterr().out, re.M)
    assert len(gaps) == 2 and all(abs(float(g)) < 1e-3 for g in gaps)
    argv[argv.index("--val_d_path") + 1] = str(tmp_path / "missing")
    assert "missing" in one_line_error(generalization_gap.main, argv, capsys)
