"""Known-pixel conditioning of the transformer and the shift augmentation: zero-initialised equivalence, only known
pixels seen, a trunk continued with both, and the sampler passing the masked image (tiny CPU models)."""
from __future__ import annotations

import copy
import csv
from types import SimpleNamespace

import pytest
import torch
import yaml
from tiny_maskgit import TINY_TRANSFORMER, brush_masks, make_tiny_setup, make_tiny_setup_with_cache, one_line_error

import training_transformer
from training_transformer import training_images
from models.Transformer import BidirectionalTransformer
from models.Transformer.transformer import known_pixel_patches
from models.VQGAN_Transformer import MaskGit, load_maskgit_config
from sampler.maskgit_sampler import inpaint
from training import augment
from training.token_cache import encode_tokens
from training.transformer import image_tensor, normalized
from utils.checkpoint import load_training_state, load_weights
from utils.config import ConfigError

PIXEL_TRANSFORMER = {**TINY_TRANSFORMER, "pixel_conditioning": True}


def with_random_pixel_emb(model: BidirectionalTransformer) -> BidirectionalTransformer:
    """The model as training leaves it: pixel_emb no longer zero, so that the pixels do reach the logits."""
    torch.nn.init.normal_(model.pixel_emb.weight, 0, 0.5)
    return model.eval()


def inputs(b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 33, (b, 256), generator=g)
    return tokens, torch.randn(b, 3, 64, 64, generator=g), brush_masks(b, seed=seed)


def test_zero_initialised_conditioning_is_the_model_without_it():
    torch.manual_seed(0)
    plain = BidirectionalTransformer(TINY_TRANSFORMER).eval()
    torch.manual_seed(0)
    conditioned = BidirectionalTransformer(PIXEL_TRANSFORMER).eval()
    # every other weight is drawn as without it, and the layout is the lab's with pixel_emb appended
    assert list(conditioned.state_dict())[:-2] == list(plain.state_dict())
    assert list(conditioned.state_dict())[-2:] == ["pixel_emb.weight", "pixel_emb.bias"]
    assert all(torch.equal(v, conditioned.state_dict()[k]) for k, v in plain.state_dict().items())
    tokens, images, known = inputs()
    mask = tokens == 32
    assert torch.equal(conditioned(tokens, pixels=(images, known)), plain(tokens))  # zero at its first step
    # a checkpoint without it is the same function, whatever the pixels
    other = BidirectionalTransformer(PIXEL_TRANSFORMER).eval()
    other.load_state_dict(other.with_pixel_conditioning(plain.state_dict()), strict=True)
    assert torch.equal(other(tokens, pixels=(images, known)), plain(tokens))
    assert torch.equal(other(tokens, mask, pixels=(images, known)), plain(tokens, mask))
    with pytest.raises(ValueError, match="pixel_conditioning"):
        other(tokens)


def test_the_conditioning_sees_only_known_pixels():
    torch.manual_seed(1)
    model = with_random_pixel_emb(BidirectionalTransformer(PIXEL_TRANSFORMER))
    tokens, images, known = inputs()
    logits = model(tokens, pixels=(images, known))
    repainted = torch.where(known, images, torch.randn_like(images) * 5)  # any values in the holes
    assert torch.equal(model(tokens, pixels=(repainted, known)), logits)
    nudged = images.clone()
    y, x = torch.nonzero(known[0, 0])[0]
    nudged[0, :, y, x] += 1.0  # one known pixel: its token's logits move
    assert not torch.allclose(model(tokens, pixels=(nudged, known))[0], logits[0])
    assert torch.equal(model(tokens, pixels=(nudged, known))[1:], logits[1:])


def test_known_pixel_patches_are_each_tokens_own_patch_in_row_major_order():
    images = torch.arange(2 * 3 * 64 * 64, dtype=torch.float32).view(2, 3, 64, 64)
    known = torch.rand(2, 1, 64, 64) > 0.5
    patches = known_pixel_patches(images, known, 16)
    assert patches.shape == (2, 256, 64)
    row, col = 5, 11  # token 5 * 16 + 11 covers pixels [20:24, 44:48]
    patch = (images * known)[1, :, 20:24, 44:48]
    assert torch.equal(patches[1, row * 16 + col], torch.cat([patch.flatten(), known[1, 0, 20:24, 44:48].float().flatten()]))


def test_a_config_switch_that_is_not_a_bool_is_refused(tmp_path):
    tiny = make_tiny_setup(tmp_path / "tiny", n_train=1, n_val=1)
    cfg = yaml.safe_load(tiny.maskgit_config.read_text())
    cfg["model_param"]["Transformer_param"]["pixel_conditioning"] = "yes"
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="pixel_conditioning is 'yes'"):
        load_maskgit_config(bad)


def test_jitter_shifts_by_whole_pixels_within_three_and_zooms_inside_the_image(monkeypatch):
    images = torch.rand(64, 3, 64, 64)
    monkeypatch.setattr(augment, "ZOOM_PROB", 0.0)
    moved = augment.jitter(images, augment.draw_jitters(64, torch.Generator().manual_seed(0)))
    shifts = set()
    for original, out in zip(images, moved):
        found = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                 if torch.allclose(out[:, 3:-3, 3:-3], torch.roll(original, (-dy, -dx), (1, 2))[:, 3:-3, 3:-3],
                                   atol=1e-5)]
        assert len(found) == 1  # exact pixels, moved by a whole number of pixels
        shifts.add(found[0])
    assert len(shifts) > 20  # most of the 49 shifts occur
    monkeypatch.setattr(augment, "ZOOM_PROB", 1.0)
    zoomed = augment.jitter(images, augment.draw_jitters(64))
    assert zoomed.min() >= images.min() and zoomed.max() <= images.max()  # convex combinations of pixels
    assert not torch.allclose(zoomed, images)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    setup = make_tiny_setup_with_cache(tmp_path_factory.mktemp("tiny"))
    cfg = yaml.safe_load(setup.maskgit_config.read_text())
    cfg["model_param"]["Transformer_param"]["pixel_conditioning"] = True
    setup.pixel_config = setup.root / "MaskGit_tiny_pixels.yml"
    setup.pixel_config.write_text(yaml.safe_dump(cfg))
    return setup


def run(tiny, out, config, *extra):
    argv = ["--MaskGitConfig", str(config), "--train_d_path", str(tiny.train_dir), "--val_d_path", str(tiny.train_dir),
            "--checkpoint-path", str(out), "--device", "cpu", "--num_workers", "0", "--batch-size", "4",
            "--warmup-steps", "2", "--learning-rate", "1e-3", "--token-cache", str(tiny.cache), "--schedule", "wsd",
            "--train-masks", "mix", "--hole-mask-prob", "0.5"]
    return training_transformer.main(argv + [str(a) for a in extra])


def step_losses(folder):
    with open(folder / "train_steps.csv") as f:
        return {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(f)}


def test_a_trunk_without_conditioning_continues_with_it_and_with_shifts(tiny, tmp_path, capsys):
    trunk = tmp_path / "trunk"
    assert run(tiny, trunk, tiny.maskgit_config, "--max-steps", 4) == 0
    plain, pixels = tmp_path / "plain", tmp_path / "pixels"
    assert run(tiny, plain, tiny.maskgit_config, "--max-steps", 6, "--resume-from", trunk / "trunk_state.pt") == 0
    assert run(tiny, pixels, tiny.pixel_config, "--max-steps", 6, "--resume-from", trunk / "trunk_state.pt") == 0
    # the first step after the resume is the same function on the same batch; then pixel_emb has learned
    assert step_losses(pixels)[5] == pytest.approx(step_losses(plain)[5], abs=1e-6)
    weights = load_weights(pixels / "transformer_raw_last.pt")
    assert weights["pixel_emb.weight"].abs().sum() > 0
    state = load_training_state(pixels / "training_state.pt")
    assert len(state["optimizer"]["state"]) == len(weights)  # every parameter, pixel_emb's included, has moments
    # the conditioned run continues exactly, and a branch may change the augmentation; --resume may not
    shifted = tmp_path / "shifted"
    assert run(tiny, shifted, tiny.pixel_config, "--max-steps", 8, "--augment", "shift",
               "--resume-from", pixels / "training_state.pt") == 0
    assert step_losses(shifted)[8] > 0
    err = one_line_error(training_transformer.main,
                         ["--MaskGitConfig", str(tiny.pixel_config), "--checkpoint-path", str(shifted), "--resume",
                          "--schedule", "wsd", "--train-masks", "mix", "--token-cache", str(tiny.cache),
                          "--batch-size", "4", "--warmup-steps", "2", "--learning-rate", "1e-3"], capsys)
    assert "--augment was shift in the saved run, now flip" in err



def test_shifted_grids_are_cached_once_and_are_the_tokens_of_the_pixels_a_step_sees(tiny, tmp_path):
    cache = augment.shifted_cache_path(tiny.cache)
    cache.unlink(missing_ok=True)
    assert run(tiny, tmp_path / "a", tiny.pixel_config, "--max-steps", 2, "--augment", "shift") == 0
    built = cache.stat().st_mtime_ns
    tokens, jitters = augment.load_shifted_tokens(cache)
    images = image_tensor(training_images(SimpleNamespace(train_d_path=tiny.train_dir,
                                                          val_d_path=tiny.train_dir))[0])
    n = len(images)
    assert tokens.shape == (augment.SHIFT_VARIANTS, 2 * n, 256) and jitters.shape == (augment.SHIFT_VARIANTS, 2 * n, 3)
    # what a step feeds the transformer: the sequence's pixels (flipped for r >= n), jittered by the variant's
    # jitter, and as targets that very image's tokens
    vqgan = MaskGit(load_maskgit_config(tiny.pixel_config)).vqgan.eval()
    for v, r in ((0, 1), (augment.SHIFT_VARIANTS - 1, n + 2)):
        pixels = normalized(images[r % n][None], "train")
        pixels = pixels.flip(-1) if r >= n else pixels
        seen = augment.jitter(pixels, jitters[v, r][None])
        assert torch.equal(encode_tokens(vqgan, seen, "none")[0], tokens[v, r].long())
    assert len({tuple(t.tolist()) for t in tokens[:, 1]}) > 1  # the variants are other grids
    # a second run reuses the cache, and continues the first exactly
    assert run(tiny, tmp_path / "a", tiny.pixel_config, "--max-steps", 4, "--augment", "shift", "--resume") == 0
    assert cache.stat().st_mtime_ns == built
    assert run(tiny, tmp_path / "b", tiny.pixel_config, "--max-steps", 4, "--augment", "shift") == 0
    assert step_losses(tmp_path / "a") == pytest.approx(step_losses(tmp_path / "b"), abs=1e-6)


def test_inpaint_passes_the_masked_image_and_its_known_pixels_to_the_transformer(tiny):
    model = MaskGit(load_maskgit_config(tiny.pixel_config)).eval()
    with_random_pixel_emb(model.transformer)
    seen = []
    model.transformer.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["pixels"]),
                                            with_kwargs=True)
    images, known = torch.randn(2, 3, 64, 64), brush_masks(2)
    first = inpaint(model, images, known, total_iter=3, argmax=True, amp="none")
    assert len(seen) == 3 and all(p[0] is images and torch.equal(p[1], known) for p in seen)
    # the conditioning changes the fill: without its known pixels the same model decodes other tokens
    blind = copy.deepcopy(model)
    torch.nn.init.zeros_(blind.transformer.pixel_emb.weight)
    second = inpaint(blind, images, known, total_iter=3, argmax=True, amp="none")
    assert not torch.equal(first.decode.tokens, second.decode.tokens)
