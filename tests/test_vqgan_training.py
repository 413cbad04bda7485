"""The stage-1 training step: memory layout does not change the numbers, the losses fall, the GAN switches on at
disc_start, and the precision choice follows the hardware."""
from __future__ import annotations

import copy

import pytest
import torch

from test_vqgan import TINY
from models.VQGAN import VQGAN
from training.vqgan import LR_DECAY_FLOOR, VQGANTrainer, lr_factor, validate
from utils.precision import bf16_is_fast, resolve_amp

TRAIN_PARAM = dict(batch_size=4, learning_rate=1e-3, disc_start=3, disc_base_channels=8, dead_code_window=2)


def outputs_and_grads(model: VQGAN, x: torch.Tensor, amp: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        rec, _, q_loss = model(x)
    (rec.float().square().mean() + q_loss).backward()
    return rec.float().contiguous(), {k: p.grad.contiguous() for k, p in model.named_parameters() if p.grad is not None}


def relative_error(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    return ((a - b).norm() / (a.norm() + floor)).item()


def layouts(seed: int = 0) -> tuple[VQGAN, VQGAN, torch.Tensor]:
    torch.manual_seed(seed)
    model = VQGAN(TINY)
    return model, copy.deepcopy(model).to(memory_format=torch.channels_last), torch.randn(2, 3, 64, 64)


def test_channels_last_gives_the_outputs_and_gradients_of_the_default_layout():
    model, cl, x = layouts()
    rec_a, grads_a = outputs_and_grads(model, x, amp=False)
    rec_b, grads_b = outputs_and_grads(cl, x.contiguous(memory_format=torch.channels_last), amp=False)
    assert cl.encoder.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(rec_a, rec_b) <= 1e-5
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    floor = 1e-3 * max(g.norm() for g in grads_a.values()).item()  # e.g. key biases: zero gradient up to rounding
    for k in grads_a:
        assert relative_error(grads_a[k], grads_b[k], floor) <= 1e-5, k


def test_under_bf16_channels_last_is_as_close_to_fp32_as_the_default_layout():
    """bf16 rounding differs with the summation order, so both layouts are held to the fp32 result instead."""
    model, cl, x = layouts()
    rec_ref, grads_ref = outputs_and_grads(model, x, amp=False)
    rec_a, grads_a = outputs_and_grads(model, x, amp=True)
    rec_b, grads_b = outputs_and_grads(cl, x.contiguous(memory_format=torch.channels_last), amp=True)
    assert relative_error(rec_ref, rec_b) <= 2 * relative_error(rec_ref, rec_a) + 0.01
    assert relative_error(rec_ref, rec_b) < 0.1
    floor = 1e-3 * max(g.norm() for g in grads_ref.values()).item()
    for k in grads_ref:
        err_a, err_b = relative_error(grads_ref[k], grads_a[k], floor), relative_error(grads_ref[k], grads_b[k], floor)
        assert err_b <= 2 * err_a + 0.02 and err_b < 0.2, (k, err_a, err_b)


def test_training_steps_lower_the_loss_and_switch_the_gan_on_at_disc_start():
    torch.manual_seed(0)
    trainer = VQGANTrainer(TINY, TRAIN_PARAM, torch.device("cpu"), amp="none")
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    trainer.init_codebook(x)
    steps = [trainer.train_step(x) for _ in range(12)]
    assert [("d_loss" in s) for s in steps[:4]] == [False, False, False, True]
    assert all("g_loss" in s and "d_loss" in s for s in steps[3:])
    assert steps[-1]["rec_loss"] < 0.7 * steps[0]["rec_loss"]
    assert trainer.step == 12 and int(trainer.last_used.max()) == 12
    metrics = validate(trainer.model, x, batch_size=3, amp="none")
    assert 0 < metrics["codebook_usage"] <= 1 and metrics["perplexity"] >= 1 and metrics["val_psnr"] > 5


def test_start_gan_switches_the_gan_on_from_the_next_step():
    """A run on a time budget decides when the GAN starts, not a step count."""
    trainer = VQGANTrainer(TINY, {**TRAIN_PARAM, "disc_start": 10 ** 9}, torch.device("cpu"), amp="none")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert "d_loss" not in trainer.train_step(x)
    trainer.start_gan()
    assert "d_loss" in trainer.train_step(x) and trainer.tp["disc_start"] == 1


def test_a_trainer_state_restores_the_next_step_exactly():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    a = VQGANTrainer(TINY, TRAIN_PARAM, torch.device("cpu"), amp="none")
    for _ in range(4):
        a.train_step(x)
    b = VQGANTrainer(TINY, TRAIN_PARAM, torch.device("cpu"), amp="none")
    b.load_state_dict(copy.deepcopy(a.state_dict()), source="test")
    torch.manual_seed(1)  # dead-code restarts draw from the global generator
    la = a.train_step(x)
    torch.manual_seed(1)
    lb = b.train_step(x)
    assert la == lb
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


def test_a_non_finite_loss_stops_before_any_weight_changes():
    trainer = VQGANTrainer(TINY, TRAIN_PARAM, torch.device("cpu"), amp="none")
    before = copy.deepcopy(trainer.model.state_dict())
    with pytest.raises(FloatingPointError, match="training loss"):
        trainer.train_step(torch.full((2, 3, 64, 64), float("nan")))
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_auto_precision_is_bf16_exactly_where_bf16_is_fast():
    assert resolve_amp("auto", "cpu") == ("bf16" if bf16_is_fast("cpu") else "none")
    assert resolve_amp("bf16", "cpu") == "bf16" and resolve_amp("none", "cpu") == "none"
    with pytest.raises(ValueError, match="choose one of"):
        resolve_amp("fp16", "cpu")


def test_lr_decay_is_a_cosine_from_start_to_end_applied_to_both_optimizers():
    assert lr_factor(5, None) == 1.0 and lr_factor(10, (10, 20)) == 1.0
    factors = [lr_factor(s, (10, 20)) for s in range(10, 25)]
    assert all(a > b for a, b in zip(factors[:11], factors[1:11]))  # strictly falling from start to end
    assert factors[5] == pytest.approx((1 + LR_DECAY_FLOOR) / 2) and factors[10:] == [LR_DECAY_FLOOR] * 5
    torch.manual_seed(0)
    trainer = VQGANTrainer(TINY, {**TRAIN_PARAM, "lr_decay": (1, 3)}, torch.device("cpu"), amp="none")
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    for _ in range(5):
        trainer.train_step(x)
    rates = [g["lr"] for opt in (trainer.opt, trainer.opt_d) for g in opt.param_groups]
    assert rates == pytest.approx([TRAIN_PARAM["learning_rate"] * LR_DECAY_FLOOR] * 2)  # step 4 is past the end
