"""The batched inpainting decoder (sampler/maskgit_sampler.py) against its stated convention and the lab's loop."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_maskgit import brush_masks, make_tiny_setup

from models.schedules import gamma_func
from models.VQGAN_Transformer import MaskGit, load_maskgit_config
from sampler.lab_loop import lab_way_inpaint
from sampler.latent_mask import latent_known_mask
from sampler import maskgit_sampler
from sampler.maskgit_sampler import decode, halton_order, inpaint, tokens_to_uint8
from utils.image import denormalize, diffuse_fill, normalize, to_uint8, uint8_to_tensor

T = 8
FP32_ARGMAX = dict(amp="none", argmax=True, choice_temperature=0.0)


@pytest.fixture(scope="module")
def maskgit(tmp_path_factory):
    torch.manual_seed(0)
    return MaskGit(load_maskgit_config(make_tiny_setup(tmp_path_factory.mktemp("tiny")).maskgit_config)).eval()


@pytest.fixture(scope="module")
def batch():
    """Four masked test images with different hole sizes: (normalized images, known pixels, masked uint8)."""
    rng = np.random.default_rng(0)
    raw = np.kron(rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), np.ones((1, 8, 8, 1), dtype=np.uint8))
    known = brush_masks(4, seed=1)
    known[1, :, 8:40, 8:56] = False  # a much larger hole
    known[2, :, :, :32] = True       # a smaller one
    masked = np.where(known.permute(0, 2, 3, 1).numpy(), raw, 128).astype(np.uint8)
    return normalize(uint8_to_tensor(masked), "test"), known, masked


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_batched_argmax_fp32_equals_the_lab_way_per_image(maskgit, batch):
    images, known, _ = batch
    counts = (~latent_known_mask(known)).sum(1)
    assert len(set(counts.tolist())) == 4  # the rows really differ in their number of masked tokens
    ours = inpaint(maskgit, images, known, total_iter=T, **FP32_ARGMAX).decode.tokens
    for b in range(4):
        lab, decoded = lab_way_inpaint(maskgit, images[b:b + 1], known[b:b + 1], T, argmax=True, choice_temperature=0.0)
        assert len(decoded) == T
        assert torch.equal(ours[b:b + 1], lab)
    # one image, with the Gumbel term on: both draw the same noise from the same seed
    ours = inpaint(maskgit, images[:1], known[:1], total_iter=T, amp="none", argmax=True, generator=gen(5))
    lab, _ = lab_way_inpaint(maskgit, images[:1], known[:1], T, argmax=True, choice_temperature=4.5, generator=gen(5))
    assert torch.equal(ours.decode.tokens, lab)


def test_batch_with_different_masked_counts_equals_per_image_decoding(maskgit, batch):
    images, known, _ = batch
    masked = ~latent_known_mask(known)
    _, indices = maskgit.encode_to_z(images)
    together = decode(maskgit.transformer, indices, masked, gamma_type="square", **FP32_ARGMAX).tokens
    for b in range(4):
        alone = decode(maskgit.transformer, indices[b:b + 1], masked[b:b + 1], gamma_type="square", **FP32_ARGMAX)
        assert torch.equal(together[b:b + 1], alone.tokens)


@pytest.mark.parametrize("mode", ["cosine", "linear", "log"])
def test_schedule_convention(maskgit, batch, mode):
    images, known, _ = batch
    out = inpaint(maskgit, images, known, total_iter=T, gamma_type=mode, generator=gen(), keep_steps=True)
    masked0 = ~out.known_tokens
    _, encoded = maskgit.encode_to_z(images)
    gamma, m = gamma_func(mode), masked0.sum(1)
    counts = torch.stack([mask.sum(1) for mask in out.decode.step_masks])  # [T, B]
    expected = torch.tensor([[math.ceil(float(gamma((t + 1) / T)) * int(mb)) for mb in m] for t in range(T)])
    assert torch.equal(counts, expected)
    assert (counts[1:] <= counts[:-1]).all() and (counts[-1] == 0).all()
    prev_mask = masked0
    for tokens, mask in zip(out.decode.step_tokens, out.decode.step_masks):
        assert torch.equal(tokens[~masked0], encoded[~masked0])       # known tokens never change
        assert not (mask & ~prev_mask).any()                          # only still-masked tokens are re-masked
        fixed = ~mask
        assert torch.equal(tokens[fixed], out.decode.tokens[fixed])   # a fixed token stays fixed
        assert (tokens < maskgit.mask_token_id).all()
        prev_mask = mask
    assert torch.equal(out.decode.tokens, out.decode.step_tokens[-1])


def test_same_seed_same_pixels(maskgit, batch):
    images, known, _ = batch
    a = inpaint(maskgit, images, known, generator=gen(7))
    b = inpaint(maskgit, images, known, generator=gen(7))
    c = inpaint(maskgit, images, known, generator=gen(8))
    assert np.array_equal(a.images, b.images) and torch.equal(a.decode.tokens, b.decode.tokens)
    assert not torch.equal(a.decode.tokens, c.decode.tokens)


def test_paste_back_is_exact_and_can_be_turned_off(maskgit, batch):
    images, known, masked = batch
    # the sampler recovers the uint8 input from the normalized one: exact for every 8-bit value and channel
    values = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None, None], (1, 256, 1, 3))
    assert np.array_equal(to_uint8(denormalize(normalize(uint8_to_tensor(values), "test"), "test")), values)
    out = inpaint(maskgit, images, known, generator=gen())
    keep = known.permute(0, 2, 3, 1).numpy()[..., 0]
    assert np.array_equal(out.images[keep], masked[keep])
    raw = inpaint(maskgit, images, known, generator=gen(), paste_back=False)
    assert np.array_equal(raw.images, tokens_to_uint8(maskgit, raw.decode.tokens))
    assert not np.array_equal(raw.images[keep], masked[keep])  # random weights do not reproduce the input
    assert np.array_equal(raw.images[~keep], out.images[~keep])  # holes are the same decode either way


def test_sweet_spot_takes_that_steps_tokens(maskgit, batch):
    images, known, _ = batch
    full = inpaint(maskgit, images, known, total_iter=T, generator=gen(3), keep_steps=True).decode
    for s in (1, 3):
        early = inpaint(maskgit, images, known, total_iter=T, sweet_spot=s, generator=gen(3), keep_steps=True).decode
        assert len(early.step_tokens) == s
        assert torch.equal(early.tokens, full.step_tokens[s - 1])
        assert early.step_masks[-1].any()  # tokens were still masked: they hold that step's predictions
        assert (early.tokens < maskgit.mask_token_id).all()
    last = inpaint(maskgit, images, known, total_iter=T, sweet_spot=T, generator=gen(3)).decode
    assert torch.equal(last.tokens, full.tokens)
    with pytest.raises(ValueError, match="sweet_spot"):
        inpaint(maskgit, images, known, total_iter=T, sweet_spot=T + 1)


def test_no_hole_returns_the_input_and_all_hole_generates(maskgit, batch):
    images, known, masked = batch
    none = torch.ones_like(known)
    out = inpaint(maskgit, images, none, generator=gen())
    assert np.array_equal(out.images, masked)
    assert torch.equal(out.decode.tokens, maskgit.encode_to_z(images)[1])
    everything = torch.zeros_like(known)
    out = inpaint(maskgit, images, everything, generator=gen(), keep_steps=True)
    assert (~out.known_tokens).all()
    assert out.decode.step_masks[0].sum(1).tolist() == [math.ceil(float(gamma_func("cosine")(1 / 8)) * 256)] * 4
    assert (out.decode.tokens < maskgit.mask_token_id).all()
    assert np.array_equal(out.images, tokens_to_uint8(maskgit, out.decode.tokens))  # nothing to paste back


# ---- Halton ordering

def test_halton_order_is_a_permutation_whose_start_is_spread_over_the_grid():
    for h, w in [(16, 16), (8, 8), (3, 5), (1, 7)]:
        assert sorted(halton_order(h, w).tolist()) == list(range(h * w))
    first = halton_order(16, 16)[:16]
    rows, cols = first // 16, first % 16
    # row-major (all of row 0) or column-major (all of column 0) would leave two quadrants and three bands empty
    assert torch.bincount((rows // 8) * 2 + cols // 8, minlength=4).min() >= 3  # 8x8 quadrants
    assert torch.bincount(rows // 4, minlength=4).min() >= 3 and torch.bincount(cols // 4, minlength=4).min() >= 3


def test_halton_cells_never_hit_come_last_in_row_major_order(monkeypatch):
    full = halton_order(16, 16).tolist()
    monkeypatch.setattr(maskgit_sampler, "HALTON_POINTS_PER_CELL", 1)  # 256 points miss some of the 256 cells
    maskgit_sampler._halton_cells.cache_clear()
    try:
        short = halton_order(16, 16).tolist()
    finally:
        maskgit_sampler._halton_cells.cache_clear()
    hit = next(i for i, (a, b) in enumerate(zip(short, full)) if a != b)  # the cells the 256 points reach
    assert 100 < hit < 256 and short[hit:] == sorted(full[hit:])


def test_halton_decoding_fixes_the_earliest_masked_positions_at_the_schedules_pace(maskgit, batch):
    images, known, _ = batch
    masked = ~latent_known_mask(known)
    _, encoded = maskgit.encode_to_z(images)
    seen = []
    out = decode(maskgit.transformer, encoded, masked, total_iter=T, ordering="halton", generator=gen(1), amp="none",
                 keep_steps=True, on_step=lambda t, filled, still: seen.append((t, filled, still)))
    assert [t for t, _, _ in seen] == list(range(T))  # on_step: every step, what keep_steps keeps
    assert all(torch.equal(a, b) and torch.equal(c, d) for (_, a, c), b, d in
               zip(seen, out.step_tokens, out.step_masks))
    gamma, order = gamma_func("cosine"), halton_order(16, 16)
    for b in range(len(images)):
        in_order = order[masked[b, order]]  # this image's masked positions, earliest in the Halton order first
        m = len(in_order)
        for t, (tokens, still) in enumerate(zip(out.step_tokens, out.step_masks)):
            n_t = math.ceil(float(gamma((t + 1) / T)) * m)
            left = torch.zeros_like(still[b])
            left[in_order[m - n_t:]] = True  # the n_t latest stay masked; step 0 fixes the m - n_0 earliest
            assert torch.equal(still[b], left)
            assert torch.equal(tokens[b][~masked[b]], encoded[b][~masked[b]])  # known tokens never change
    assert (out.tokens < maskgit.mask_token_id).all()
    # the order ignores the candidates: another seed draws other tokens, but reveals the same positions
    other = decode(maskgit.transformer, encoded, masked, total_iter=T, ordering="halton", generator=gen(2),
                   amp="none", keep_steps=True)
    assert all(torch.equal(a, b) for a, b in zip(other.step_masks, out.step_masks))
    assert not torch.equal(other.tokens, out.tokens)
    with pytest.raises(ValueError, match="ordering"):
        decode(maskgit.transformer, encoded, masked, ordering="random")


# ---- beyond the lab: pixel guidance and the seam blend

def test_diffuse_fill_keeps_known_pixels_and_stays_within_their_range():
    rng = np.random.default_rng(0)
    values = torch.from_numpy(rng.uniform(-1, 2, (3, 2, 16, 16))).float()
    known = torch.from_numpy(brush_masks(3, seed=4)[:, :, :16, :16].numpy())
    known[2] = False  # no known pixel at all
    filled = diffuse_fill(values, known)
    assert torch.equal(filled[:2][known[:2].expand(-1, 2, -1, -1)], values[:2][known[:2].expand(-1, 2, -1, -1)])
    for b in range(2):
        inside = values[b][known[b].expand(2, -1, -1)]
        assert filled[b].min() >= inside.min() - 1e-6 and filled[b].max() <= inside.max() + 1e-6
    assert (filled[2] == 0).all()
    constant = diffuse_fill(torch.full((1, 3, 16, 16), 0.25), known[:1])
    assert torch.allclose(constant, torch.full_like(constant, 0.25))


def test_seam_blend_carries_the_border_offset_into_the_hole(maskgit, batch):
    images, known, _ = batch
    tokens = maskgit.encode_to_z(images)[1]
    decoded = tokens_to_uint8(maskgit, tokens)
    base = np.clip(decoded.astype(int) + 20, 0, 255).astype(np.uint8)  # known pixels 20 levels brighter
    hole = ~known.permute(0, 2, 3, 1).numpy()[..., 0]
    plain = tokens_to_uint8(maskgit, tokens, base, known)
    blended = tokens_to_uint8(maskgit, tokens, base, known, seam_blend=True)
    assert np.array_equal(plain[hole], decoded[hole])
    offset = blended[hole].astype(int) - decoded[hole]  # 20 except near known pixels that clipped at 255
    assert np.median(offset) == 20 and np.mean(np.abs(offset - 20) <= 1) > 0.9
    assert np.array_equal(blended[~hole], base[~hole])


def test_pixel_guidance_zero_is_the_lab_decoding_and_strong_guidance_follows_the_pixels(maskgit, batch):
    images, known, _ = batch
    lab = inpaint(maskgit, images, known, total_iter=T, **FP32_ARGMAX)
    zero = inpaint(maskgit, images, known, total_iter=T, pixel_guidance=0.0, **FP32_ARGMAX)
    assert torch.equal(lab.decode.tokens, zero.decode.tokens)
    strong = inpaint(maskgit, images, known, total_iter=T, pixel_guidance=1e6, **FP32_ARGMAX)
    z = maskgit.vqgan.encode_continuous(diffuse_fill(images, known))
    nearest = maskgit.vqgan.codebook.nearest(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])).view(len(images), -1)
    partly_known = torch.nn.functional.avg_pool2d(known.float(), 4).flatten(1) > 0
    assert torch.equal(strong.decode.tokens[partly_known], nearest[partly_known])
    assert torch.equal(strong.decode.tokens[strong.known_tokens], nearest[strong.known_tokens])
    assert not torch.equal(strong.decode.tokens, lab.decode.tokens)


def test_guided_batch_equals_per_image(maskgit, batch):
    images, known, _ = batch
    kwargs = dict(total_iter=T, pixel_guidance=3.0, seam_blend=True, **FP32_ARGMAX)
    together = inpaint(maskgit, images, known, **kwargs)
    for b in range(len(images)):
        alone = inpaint(maskgit, images[b:b + 1], known[b:b + 1], **kwargs)
        assert torch.equal(alone.decode.tokens[0], together.decode.tokens[b])
        # the VQGAN decoder's convolutions may round differently at another batch size: one 8-bit level at most
        assert np.abs(alone.images[0].astype(int) - together.images[b]).max() <= 1


class FixedLogits(torch.nn.Module):
    """A stand-in transformer whose logits are the same fixed vector at every position: code 0 is the likeliest."""
    mask_token_id, num_codebook_vectors = 8, 8

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.linspace(1.0, 0.0, self.mask_token_id + 1)
        return logits.expand(*tokens.shape, -1)


def test_step_temperature_is_constant_or_linear_from_first_to_last_step():
    assert [maskgit_sampler.step_temperature(t, 5, 1.5, 0.5) for t in range(5)] == [1.5, 1.25, 1.0, 0.75, 0.5]
    assert maskgit_sampler.step_temperature(3, 5, 0.7, None) == 0.7
    assert maskgit_sampler.step_temperature(0, 1, 2.0, 0.1) == 2.0  # one step: the start temperature


def test_annealed_sampling_is_hot_early_and_greedy_at_the_last_step():
    tokens, masked = torch.zeros(4, 64, dtype=torch.long), torch.ones(4, 64, dtype=torch.bool)
    # halton ordering: which positions a step fixes does not depend on the candidates drawn there
    kwargs = dict(total_iter=2, temperature=50.0, ordering="halton", amp="none")
    out = decode(FixedLogits(), tokens, masked, final_temperature=1e-3, keep_steps=True, generator=gen(0), **kwargs)
    first, left = out.step_tokens[0], out.step_masks[0]
    fixed_early = first[~left]
    assert len(set(fixed_early.tolist())) == 8  # nearly uniform at temperature 50: every code comes up
    assert (out.tokens[left] == 0).all() and left.any()  # the last step, at 1e-3, takes the likeliest code
    constant = decode(FixedLogits(), tokens, masked, generator=gen(0), **kwargs)
    assert (constant.tokens[left] != 0).any()  # without the anneal the last step samples as hot as the first
    same = decode(FixedLogits(), tokens, masked, final_temperature=50.0, generator=gen(0), **kwargs)
    assert torch.equal(same.tokens, constant.tokens)
