"""MaskGit (models/VQGAN_Transformer.py): MVTM masking, the masked-only loss, checkpoints, config errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from tiny_maskgit import TINY_TRANSFORMER, make_tiny_setup

from models.schedules import gamma_func
from models.Transformer import BidirectionalTransformer
from models.VQGAN_Transformer import MaskGit, load_maskgit_config, mask_tokens, masked_correct, mvtm_loss
from utils.checkpoint import CheckpointError
from utils.config import ConfigError
from utils.image import denormalize, normalize, read_rgb, uint8_to_tensor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_setup(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def maskgit(tiny):
    return MaskGit(load_maskgit_config(tiny.maskgit_config)).eval()


@pytest.mark.parametrize("mode", ["cosine", "linear", "square"])
def test_mask_tokens_masks_ceil_gamma_r_n_positions(mode):
    gamma, n, b, mask_id = gamma_func(mode), 256, 200, 1024
    indices = torch.randint(0, 1024, (b, n))
    corrupted, mask = mask_tokens(indices, gamma, mask_id, torch.Generator().manual_seed(3))
    r = torch.rand(b, generator=torch.Generator().manual_seed(3))  # the same first draw as inside mask_tokens
    expected = torch.tensor([math.ceil(gamma(float(x)).item() * n) for x in r])
    assert torch.equal(mask.sum(1), expected)
    assert (corrupted[mask] == mask_id).all() and torch.equal(corrupted[~mask], indices[~mask])
    assert expected.min() >= 1 and len(set(expected.tolist())) > 50  # ratios vary per sample
    # positions are random: no position is masked far more often than the mean rate
    rate = mask.float().mean(0)
    assert (rate - rate.mean()).abs().max() < 0.2


def test_mask_tokens_is_reproducible_with_a_generator_and_random_without():
    x = torch.randint(0, 32, (4, 256))
    a = mask_tokens(x, gamma_func("cosine"), 32, torch.Generator().manual_seed(0))[1]
    b = mask_tokens(x, gamma_func("cosine"), 32, torch.Generator().manual_seed(0))[1]
    c = mask_tokens(x, gamma_func("cosine"), 32)[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mask_tokens_inside_a_region_masks_max_1_ceil_gamma_r_of_it_and_nothing_else():
    gamma, b, n = gamma_func("cosine"), 300, 256
    indices = torch.randint(0, 32, (b, n))
    region = torch.rand(b, n, generator=torch.Generator().manual_seed(1)) < torch.linspace(0, 0.5, b)[:, None]
    region[0] = False  # an empty region
    region[1] = False
    region[1, 7] = True  # a region of one token
    corrupted, mask = mask_tokens(indices, gamma, 32, torch.Generator().manual_seed(3), region)
    r = torch.rand(b, generator=torch.Generator().manual_seed(3))  # the same first draw as inside mask_tokens
    size = region.sum(1)
    expected = torch.tensor([min(int(s), max(1, math.ceil(gamma(float(x)).item() * s))) for x, s in zip(r, size)])
    assert torch.equal(mask.sum(1), expected) and not (mask & ~region).any()
    assert mask[1, 7] and not mask[0].any()
    assert (corrupted[mask] == 32).all() and torch.equal(corrupted[~mask], indices[~mask])
    # an all-True region is the plain rule: the same draws give the same masks
    everywhere = mask_tokens(indices, gamma, 32, torch.Generator().manual_seed(3), torch.ones(b, n, dtype=torch.bool))
    assert torch.equal(everywhere[1], mask_tokens(indices, gamma, 32, torch.Generator().manual_seed(3))[1])


def test_loss_counts_masked_positions_only():
    torch.manual_seed(0)
    logits, target = torch.randn(3, 256, 33), torch.randint(0, 32, (3, 256))
    mask = torch.rand(3, 256) < 0.4
    loss = mvtm_loss(logits, target, mask)
    assert torch.allclose(loss, F.cross_entropy(logits[mask], target[mask]))
    changed = logits.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 10
    assert torch.equal(mvtm_loss(changed, target, mask), loss)
    i, j = mask.nonzero()[0].tolist()
    changed[i, j, target[i, j]] += 5.0  # a more confident right answer at one masked position
    assert mvtm_loss(changed, target, mask) < loss


def test_label_smoothing_matches_its_definition():
    torch.manual_seed(1)
    logits, target = torch.randn(2, 256, 33), torch.randint(0, 32, (2, 256))
    mask = torch.rand(2, 256) < 0.5
    logp = logits[mask].log_softmax(-1)
    nll = -logp.gather(1, target[mask][:, None]).squeeze(1)
    expected = (0.9 * nll - 0.1 * logp.mean(-1)).mean()
    assert torch.allclose(mvtm_loss(logits, target, mask, label_smoothing=0.1), expected, atol=1e-6)


def test_masked_correct():
    logits = torch.full((1, 4, 5), -1.0)
    logits[0, torch.arange(4), torch.tensor([0, 1, 2, 3])] = 1.0
    target, mask = torch.tensor([[0, 1, 4, 4]]), torch.tensor([[True, False, True, False]])
    assert masked_correct(logits, target, mask) == (1, 2)


def test_maskgit_attributes_encode_decode_and_forward(tiny, maskgit):
    assert maskgit.num_image_tokens == 256 and maskgit.mask_token_id == 32
    assert maskgit.choice_temperature == 4.5 and maskgit.gamma_type == "cosine"
    assert maskgit.gamma_func("linear")(0.25).item() == pytest.approx(0.75)
    assert not any(p.requires_grad for p in maskgit.vqgan.parameters())
    maskgit.train()
    assert not maskgit.vqgan.training and maskgit.transformer.training
    maskgit.eval()
    files = sorted(tiny.train_dir.glob("*.png"))[:2]
    x = normalize(torch.stack([uint8_to_tensor(read_rgb(f)) for f in files]))
    z_q, idx = maskgit.encode_to_z(x)
    assert z_q.shape == (2, 16, 16, 16) and idx.shape == (2, 256) and idx.max() < 32
    assert maskgit.decode_tokens(idx).shape == (2, 3, 64, 64)
    logits, target, mask = maskgit(x)  # images are tokenized first
    assert logits.shape == (2, 256, 33) and torch.equal(target, idx) and mask.shape == (2, 256)
    logits, target, mask = maskgit(idx)
    assert torch.equal(target, idx) and mask.any(1).all()


def test_tokenize_and_detokenize_carry_the_normalization_split(tiny, maskgit):
    files = sorted(tiny.train_dir.glob("*.png"))[:2]
    x = torch.stack([uint8_to_tensor(read_rgb(f)) for f in files])  # [0, 1]
    for split in ("train", "test"):
        tokens = maskgit.tokenize(x, split)
        assert torch.equal(tokens, maskgit.encode_to_z(normalize(x, split))[1])
        assert torch.equal(maskgit.detokenize(tokens, split), denormalize(maskgit.decode_tokens(tokens).float(), split))
    # the nearest code of every latent is the token the VQGAN assigns
    assert torch.equal(maskgit.code_distances(normalize(x, "test")).argmin(-1), maskgit.tokenize(x, "test"))


def test_transformer_checkpoint_loads_strictly(tiny, maskgit, tmp_path):
    other = BidirectionalTransformer(TINY_TRANSFORMER)
    torch.save(other.state_dict(), tmp_path / "t.pt")
    maskgit.load_transformer_checkpoint(tmp_path / "t.pt")
    assert all(torch.equal(a, b) for a, b in zip(maskgit.transformer.state_dict().values(), other.state_dict().values()))
    torch.save(BidirectionalTransformer({**TINY_TRANSFORMER, "n_layers": 3}).state_dict(), tmp_path / "big.pt")
    with pytest.raises(CheckpointError, match="unexpected keys"):
        maskgit.load_transformer_checkpoint(tmp_path / "big.pt")


def _write_config(tiny, path, **changes):
    cfg = yaml.safe_load(tiny.maskgit_config.read_text())
    cfg["model_param"].update(changes)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_missing_vqgan_checkpoint_says_what_to_do(tiny, tmp_path):
    cfg = _write_config(tiny, tmp_path / "c.yml", VQ_Configs={"VQ_config_path": str(tiny.vq_config),
                                                            "VQ_CKPT_path": str(tmp_path / "none.pt")})
    with pytest.raises(CheckpointError, match="training_vqgan.py.*VQ_CKPT_path"):
        MaskGit(load_maskgit_config(cfg))


def test_vqgan_checkpoint_of_another_config_is_refused(tiny, tmp_path):
    other = yaml.safe_load(tiny.vq_config.read_text())
    other["model_param"]["latent_dim"] = 8
    (tmp_path / "vq.yml").write_text(yaml.safe_dump(other))
    cfg = _write_config(tiny, tmp_path / "c.yml", VQ_Configs={"VQ_config_path": str(tmp_path / "vq.yml"),
                                                            "VQ_CKPT_path": str(tiny.vq_ckpt)})
    with pytest.raises(CheckpointError, match="does not fit"):
        MaskGit(load_maskgit_config(cfg))


def test_config_errors_name_the_key(tiny, tmp_path):
    cfg = yaml.safe_load(tiny.maskgit_config.read_text())
    del cfg["model_param"]["Transformer_param"]["dim"]
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="Transformer_param.dim"):
        load_maskgit_config(tmp_path / "c.yml")
    with pytest.raises(ConfigError, match="num_codebook_vectors"):
        MaskGit(load_maskgit_config(_write_config(tiny, tmp_path / "d.yml", num_codebook_vectors=64,
                                                  Transformer_param={**TINY_TRANSFORMER, "num_codebook_vectors": 64})))
