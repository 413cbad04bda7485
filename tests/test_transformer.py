"""Stage-2 transformer: hand-written attention against PyTorch's, the lab's state_dict layout, init, heads.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_transformer.py -q
"""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from models.Transformer import ADAMW_IMPLEMENTATIONS, BidirectionalTransformer, MultiHeadAttention
from models.Transformer import attention
from models.Transformer.attention import Dropout
from models.VQGAN_Transformer import mvtm_loss

ROOT = Path(__file__).resolve().parents[1]
LAB_TSV = ROOT / "tests" / "fixtures" / "transformer_state_dict_no_attention.tsv"  # the lab's layout, no attention
SMALL = {"num_image_tokens": 256, "num_codebook_vectors": 1024, "dim": 64, "n_layers": 2, "hidden_dim": 128,
         "num_heads": 4}


def transformer_cfg(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / name).read_text())["model_param"]["Transformer_param"]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max error relative to the tensor's scale: weight gradients sum B*N terms, so elementwise rtol is unfair."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    err = relative_error(actual, expected)
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


@pytest.fixture(scope="module")
def lab_model() -> BidirectionalTransformer:
    torch.manual_seed(0)
    return BidirectionalTransformer(transformer_cfg("MaskGit.yml"))


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_attention_matches_torch(batch: int) -> None:
    """Outputs and all gradients equal nn.MultiheadAttention's (the oracle) with the same weights."""
    torch.manual_seed(batch)
    dim, heads, n = 768, 16, 256
    mine = MultiHeadAttention(dim, heads, attn_dropout=0.0)
    for p in mine.parameters():  # larger than the 0.02 init so that the softmax is far from uniform
        nn.init.normal_(p, 0.0, 0.05)
    oracle = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
    with torch.no_grad():
        oracle.in_proj_weight.copy_(mine.qkv.weight)
        oracle.in_proj_bias.copy_(mine.qkv.bias)
        oracle.out_proj.weight.copy_(mine.proj.weight)
        oracle.out_proj.bias.copy_(mine.proj.bias)
    x = torch.randn(batch, n, dim)
    grad_out = torch.randn(batch, n, dim)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()

    y1 = mine(x1)
    y2 = oracle(x2, x2, x2, need_weights=False)[0]
    assert_close_to_scale(y1, y2)
    y1.backward(grad_out)
    y2.backward(grad_out)
    assert_close_to_scale(x1.grad, x2.grad)
    pairs = [(mine.qkv.weight, oracle.in_proj_weight), (mine.qkv.bias, oracle.in_proj_bias),
             (mine.proj.weight, oracle.out_proj.weight), (mine.proj.bias, oracle.out_proj.bias)]
    for a, b in pairs:
        assert_close_to_scale(a.grad, b.grad)


def test_attention_bf16_autocast_close_to_fp32() -> None:
    """The bf16 training path keeps the attention accurate to bf16 precision."""
    torch.manual_seed(0)
    m = MultiHeadAttention(768, 16, attn_dropout=0.0)
    for p in m.parameters():
        nn.init.normal_(p, 0.0, 0.05)
    x = torch.randn(2, 256, 768)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(x).float()
    assert (low - ref).norm() / ref.norm() < 0.02


def test_model_bf16_autocast_close_to_fp32() -> None:
    """Under autocast the residual stream runs in bf16; the logits stay within bf16-level error of fp32."""
    torch.manual_seed(0)
    model = BidirectionalTransformer(SMALL).eval()
    tokens = torch.randint(0, 1025, (2, 256))
    with torch.no_grad():
        ref = model(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(tokens).float()
    assert (low - ref).norm() / ref.norm() < 0.03


def plain_attention(m: MultiHeadAttention, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The attention by autograd's plain math (the CUDA and torch.compile path), with an optional dropout mask."""
    b, n, dim = x.shape
    q, k, v = m.qkv(x).view(b, n, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
    probs = torch.matmul(q * m.scale, k.transpose(-2, -1)).softmax(dim=-1)
    if keep is not None:
        probs = probs * keep.view(probs.shape) / (1.0 - m.attn_drop.p)
    return m.proj(torch.matmul(probs, v).transpose(1, 2).reshape(b, n, dim))


def attention_and_grads(forward, m: MultiHeadAttention, x: torch.Tensor, grad_out: torch.Tensor, amp: bool
                        ) -> list[torch.Tensor]:
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        y = forward(x)
    y.float().backward(grad_out)
    return [y.detach().float(), x.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_chunked_cpu_attention_equals_the_plain_math(amp: bool, p: float, monkeypatch) -> None:
    """The CPU path (chunks of heads, backward written out) gives autograd's outputs and gradients, with the same
    dropout mask on the probabilities; chunks smaller than the batch of heads, so that several run."""
    monkeypatch.setattr(attention, "CHUNK_BYTES", 3 * 64 * 64 * (2 if amp else 4))  # 3 heads' bf16 or fp32 scores
    torch.manual_seed(0)
    m = MultiHeadAttention(64, 4, attn_dropout=p)
    for param in m.parameters():
        nn.init.normal_(param, 0.0, 0.1)
    x, grad_out = torch.randn(2, 64, 64), torch.randn(2, 64, 64)
    keep = attention.keep_mask((2 * 4, 64, 64), p) if p else None
    masks = iter(keep.split(3) if p else ())  # the chunks of 3 heads draw these masks in turn
    monkeypatch.setattr(attention, "keep_mask", lambda shape, prob, out: out.copy_(next(masks)))
    chunked = attention_and_grads(m, m, x, grad_out, amp)
    plain = attention_and_grads(lambda t: plain_attention(m, t, keep), m, x, grad_out, amp)
    assert next(masks, None) is None
    for a, b in zip(chunked, plain):
        assert_close_to_scale(a, b, tol=1e-2 if amp else 1e-5)


def test_no_builtin_attention_under_models() -> None:
    """The lab forbids PyTorch's attention implementations anywhere in the model code."""
    forbidden = re.compile(r"MultiheadAttention|scaled_dot_product|multi_head_attention_forward")
    files = [p for p in (ROOT / "models").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert any(p.name == "attention.py" for p in files)
    hits = [f"{p}: {m.group(0)}" for p in files for m in forbidden.finditer(p.read_text(errors="ignore"))]
    assert not hits, hits


def test_state_dict_layout_equals_lab(lab_model: BidirectionalTransformer) -> None:
    """Every non-attention key, shape and position equals the lab's, so lab checkpoints load strictly."""
    with LAB_TSV.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    lab = [(r["key"], tuple(int(s) for s in r["shape"].split(","))) for r in rows]
    sd = lab_model.state_dict()
    ours = [(k, tuple(v.shape)) for k, v in sd.items() if "Attention" not in k]
    assert ours == lab
    attention = [(k, tuple(v.shape)) for k, v in sd.items() if "Attention" in k]
    per_block = [("qkv.weight", (2304, 768)), ("qkv.bias", (2304,)), ("proj.weight", (768, 768)), ("proj.bias", (768,))]
    expected = [(f"blocks.{i}.Attention.{name}", shape) for i in range(15) for name, shape in per_block]
    assert attention == expected
    clone = BidirectionalTransformer(transformer_cfg("MaskGit.yml"))
    clone.load_state_dict(sd, strict=True)


def test_weight_decay_only_on_weight_matrices(lab_model: BidirectionalTransformer) -> None:
    """configure_optimizers: biases, LayerNorms and the [N, ids] output bias are not decayed, everything else is."""
    opt = lab_model.configure_optimizers(1e-4, (0.9, 0.96), 0.045)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.045 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in lab_model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in lab_model.named_parameters()
                                                          if p.dim() == 1 or n == "bias"}
    assert {"tok_emb.weight", "pos_emb", "blocks.0.Attention.qkv.weight"} <= {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(lab_model.parameters()))


def test_every_adamw_implementation_makes_the_same_step() -> None:
    """The three AdamW code paths (the benchmark picks the fastest) apply the same update; others are refused."""
    cfg = {"num_image_tokens": 16, "num_codebook_vectors": 8, "dim": 16, "n_layers": 1, "hidden_dim": 32,
           "num_heads": 2, "dropout": 0.0}
    tokens = torch.randint(0, 9, (4, 16), generator=torch.Generator().manual_seed(0))
    after = {}
    for impl in ADAMW_IMPLEMENTATIONS:
        torch.manual_seed(0)
        model = BidirectionalTransformer(cfg)
        opt = model.configure_optimizers(1e-2, (0.9, 0.96), 0.045, implementation=impl)
        for _ in range(2):
            model(tokens).square().mean().backward()
            opt.step()
            opt.zero_grad()
        after[impl] = torch.cat([p.detach().flatten() for p in model.parameters()])
    for impl in ADAMW_IMPLEMENTATIONS[1:]:
        torch.testing.assert_close(after[impl], after[ADAMW_IMPLEMENTATIONS[0]], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="AdamW implementation 'sgd'"):
        model.configure_optimizers(1e-2, (0.9, 0.96), 0.0, implementation="sgd")


def test_init_statistics(lab_model: BidirectionalTransformer) -> None:
    """trunc_normal(0, 0.02) on Linear/Embedding weights and pos_emb, zero biases, unit LayerNorms."""
    weights = [m.weight for m in lab_model.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    assert len(weights) == 15 * 4 + 2
    for w in weights + [lab_model.pos_emb]:
        assert abs(w.mean().item()) < 1e-3
        assert w.std().item() == pytest.approx(0.02, rel=0.03)
        assert w.abs().max().item() < 0.02 * 6.5
    for m in lab_model.modules():
        if isinstance(m, nn.Linear):
            assert torch.all(m.bias == 0)
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0) and m.eps == 1e-12
    assert torch.all(lab_model.bias == 0)


def test_lab_logits_shape_and_mask_token(lab_model: BidirectionalTransformer) -> None:
    assert lab_model.mask_token_id == 1024
    tokens = torch.randint(0, 1025, (2, 256))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lab_model.eval()(tokens)
    assert logits.shape == (2, 256, 1025) and torch.isfinite(logits).all()


def test_output_head_is_tied_embedding_plus_bias() -> None:
    """logits = Token_Prediction(h) @ tok_emb.weight^T + bias: editing either changes exactly what it should."""
    torch.manual_seed(0)
    model = BidirectionalTransformer(SMALL).eval()
    tokens = torch.randint(0, 512, (3, 256))  # ids >= 512 are never input: their rows only act in the head
    with torch.no_grad():
        base = model(tokens)
        model.bias[5, 700] += 3.0
        shifted = model(tokens)
        delta = torch.zeros_like(base)
        delta[:, 5, 700] = 3.0
        torch.testing.assert_close(shifted, base + delta)

        row = torch.randn(SMALL["dim"])
        model.tok_emb.weight[900] = row
        edited = model(tokens)
        h = model.Token_Prediction(model.blocks(model.LN(model.tok_emb(tokens) + model.pos_emb)))
        torch.testing.assert_close(edited[..., 900], h @ row + model.bias[:, 900], rtol=1e-5, atol=1e-5)
        others = torch.ones(1025, dtype=torch.bool)
        others[900] = False
        torch.testing.assert_close(edited[..., others], shifted[..., others])


def loss_and_grads(model: BidirectionalTransformer, tokens: torch.Tensor, mask: torch.Tensor, masked_only: bool,
                   amp: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss (label smoothing 0.1) and every gradient, with the same dropout draws on every call."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits = model(tokens.masked_fill(mask, model.mask_token_id), mask if masked_only else None)
    loss = mvtm_loss(logits, tokens, mask, label_smoothing=0.1)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [{"dropout": 0.0}, {"dropout": 0.0, "attn_dropout": 0.1}],
                         ids=["no-dropout", "attention-dropout"])
def test_logits_at_the_masked_positions_give_the_loss_and_gradients_of_all_logits(dropout: dict) -> None:
    """The training forward (the last layer after its attention heads, and the head, at the masked positions only)
    is the full forward's math: in fp32 the same loss and gradients to rounding; under bf16 autocast no farther
    from fp32's than the full forward under autocast is. Attention dropout included (drawn over all positions
    either way; the row-wise dropouts would draw on fewer rows: same distribution, other draws)."""
    torch.manual_seed(0)
    model = BidirectionalTransformer({**SMALL, **dropout}).train()
    tokens = torch.randint(0, 1024, (3, 256))
    mask = torch.rand(3, 256) < torch.tensor([[0.1], [0.5], [1.0]])
    full_loss, full = loss_and_grads(model, tokens, mask, masked_only=False, amp=False)
    loss, grads = loss_and_grads(model, tokens, mask, masked_only=True, amp=False)
    assert model(tokens, mask).shape == (int(mask.sum()), 1025)
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=0.0)
    for name, grad in full.items():
        assert_close_to_scale(grads[name], grad, tol=1e-5)

    full_bf16_loss, full_bf16 = loss_and_grads(model, tokens, mask, masked_only=False, amp=True)
    loss, grads = loss_and_grads(model, tokens, mask, masked_only=True, amp=True)
    assert abs(loss - full_loss) <= 1.5 * abs(full_bf16_loss - full_loss) + 1e-4
    for name, grad in full.items():
        assert relative_error(grads[name], grad) <= 1.5 * relative_error(full_bf16[name], grad) + 5e-3, name


def matmul_shapes(model: BidirectionalTransformer, tokens: torch.Tensor, mask: torch.Tensor) -> set[str]:
    """The input shapes of every matmul op in one training forward and backward."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        loss_and_grads(model, tokens, mask, masked_only=True, amp=False)
    return {f"{e.key} {e.input_shapes}" for e in prof.key_averages(group_by_input_shape=True)
            if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")}


def test_the_training_step_matmuls_keep_their_shapes_when_the_masked_count_changes() -> None:
    """oneDNN builds and caches a kernel per matmul shape on the CPU: a shape that followed the masked count would
    grow the training process every step (it did, by ~10 MB a step)."""
    torch.manual_seed(0)
    model = BidirectionalTransformer(SMALL).train()
    tokens = torch.randint(0, 1024, (2, 256))
    few, more = (torch.arange(512).view(2, 256) < limit for limit in (100, 130))  # 200 and 256 masked
    assert matmul_shapes(model, tokens, few) == matmul_shapes(model, tokens, more)


def test_encoder_layer_is_post_norm() -> None:
    """x = LN1(x + Attn(x)); x = LN2(x + MLP(x)), in eval mode."""
    torch.manual_seed(0)
    layer = BidirectionalTransformer(SMALL).blocks[0].eval()
    x = torch.randn(2, 256, SMALL["dim"])
    with torch.no_grad():
        h = layer.LayerNorm1(x + layer.Attention(x))
        expected = layer.LayerNorm2(h + layer.MLP[2](layer.MLP[1](layer.MLP[0](h))))
        torch.testing.assert_close(layer(x), expected)


def test_small_config_builds_and_trains_one_step() -> None:
    cfg = transformer_cfg("MaskGit_small.yml")
    model = BidirectionalTransformer(cfg).train()
    assert model.blocks[0].Attention.num_heads == cfg["num_heads"]
    tokens = torch.randint(0, 1025, (2, 256))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(tokens).float().flatten(0, 1), tokens.flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert loss.item() == pytest.approx(math.log(1025), rel=0.1)  # near-uniform predictions at init


def test_dropout_rate_scale_and_gradient() -> None:
    """The fast CPU dropout drops a fraction p, rescales by 1/(1-p), and backpropagates through the same mask."""
    torch.manual_seed(0)
    drop = Dropout(0.1).train()
    x = torch.ones(4, 16, 256, 256, dtype=torch.bfloat16, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.9, abs=2e-3)
    assert torch.all(y[kept] == torch.tensor(1 / 0.9, dtype=torch.bfloat16))
    y.float().sum().backward()
    assert torch.equal(x.grad, y.detach())
    assert not torch.equal(drop(x), y)  # a fresh mask every call
    assert torch.equal(drop.eval()(x), x)
    assert torch.all(Dropout(1.0).train()(x) == 0)
