"""Stage-1 training step: reconstruction + codebook loss, a PatchGAN hinge loss after `disc_start` steps with
the adaptive weight of Esser et al., and dead-code restart. Precision and memory layout follow the device
(utils/precision.py): bf16 autocast and channels_last where bf16 hardware makes them faster, fp32 elsewhere."""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from models.VQGAN import VQGAN
from models.VQGAN.discriminator import Discriminator
from utils.checkpoint import load_state_dict_strict
from utils.cli import UserError
from utils.data import ImageFolderDataset
from utils.image import denormalize, normalize, uint8_to_tensor
from utils.precision import autocast, conv_memory_format, resolve_amp

TRAIN_DEFAULTS = dict(batch_size=32, learning_rate=2e-4, betas=[0.5, 0.9], weight_decay=0.0, l1_weight=1.0,
                      l2_weight=1.0, disc_start=4000, disc_weight=0.1, disc_base_channels=64, dead_code_window=200,
                      lr_decay=None)
LR_DECAY_FLOOR = 0.05  # the learning rate at the end of a decay, as a fraction of the base rate


def lr_factor(step: int, decay: tuple[int, int] | None) -> float:
    """The learning-rate multiplier at `step`: 1, then with decay = (start, end) a half cosine from 1 at step start
    down to LR_DECAY_FLOOR at step end, and the floor after it. A pure function of the step, so a resumed run
    continues the same schedule."""
    if decay is None or step <= decay[0]:
        return 1.0
    progress = min(1.0, (step - decay[0]) / max(1, decay[1] - decay[0]))
    return LR_DECAY_FLOOR + (1 - LR_DECAY_FLOOR) * 0.5 * (1 + np.cos(np.pi * progress))


def load_images(folder: str, split: str, device: torch.device) -> torch.Tensor:
    """A whole split as one normalized tensor (7k images are 340 MB in fp32), in the device's fast conv layout."""
    try:
        images = ImageFolderDataset(folder, split=split).images
    except ValueError as e:
        raise UserError(str(e)) from e
    return images_to_device(images, split, device)


def images_to_device(images: np.ndarray, split: str, device: torch.device) -> torch.Tensor:
    """uint8 images [N,H,W,3] -> one normalized tensor on `device`, in the device's fast conv layout."""
    return normalize(uint8_to_tensor(images), split).to(device).contiguous(memory_format=conv_memory_format(device))


def random_hflip(x: torch.Tensor) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2 (cat faces are roughly symmetric)."""
    flip = torch.rand(len(x), device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [0,1] images."""
    mse = ((x - y) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


@torch.no_grad()
def reconstruct(model: VQGAN, images: torch.Tensor, batch_size: int, amp: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(reconstruction in [0,1], code indices) of each batch of normalized images, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(images), batch_size):
            with autocast(images.device, amp):
                rec, idx, _ = model(images[i:i + batch_size])
            yield denormalize(rec.float()), idx
    finally:
        model.train(was_training)


def validate(model: VQGAN, images: torch.Tensor, batch_size: int, amp: str) -> dict[str, float]:
    """Reconstruction PSNR (in [0,1] pixel space) and codebook usage/perplexity on the validation set."""
    psnrs, counts = [], torch.zeros(model.num_codebook_vectors)
    for i, (rec, idx) in enumerate(reconstruct(model, images, batch_size, amp)):
        psnrs.append(psnr(rec, denormalize(images[i * batch_size:(i + 1) * batch_size])))
        counts += torch.bincount(idx.cpu(), minlength=model.num_codebook_vectors).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"val_psnr": torch.cat(psnrs).mean().item(), "codebook_usage": (counts > 0).float().mean().item(),
            "perplexity": entropy.exp().item()}


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """Scale the GAN gradient to the size of the reconstruction gradient at the decoder's last layer."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class VQGANTrainer:
    """The VQGAN, its PatchGAN, both optimizers and the dead-code clock: what one training step changes."""

    def __init__(self, model_cfg: dict, train_param: dict, device: torch.device, amp: str = "auto") -> None:
        self.tp = {**TRAIN_DEFAULTS, **train_param}
        self.device, self.amp = device, resolve_amp(amp, device)
        layout = conv_memory_format(device)
        self.model = VQGAN(model_cfg).to(device, memory_format=layout)
        self.disc = Discriminator(model_cfg["image_channels"], int(self.tp["disc_base_channels"])).to(
            device, memory_format=layout)
        adam = dict(lr=self.tp["learning_rate"], betas=tuple(self.tp["betas"]), weight_decay=self.tp["weight_decay"])
        self.opt = torch.optim.AdamW(self.model.parameters(), **adam)
        self.opt_d = torch.optim.AdamW(self.disc.parameters(), **adam)
        self.last_used = torch.zeros(self.model.num_codebook_vectors, dtype=torch.long)
        self.step = 0

    @torch.no_grad()
    def init_codebook(self, images: torch.Tensor) -> None:
        """Start every code on an encoder output, so that no code is born dead."""
        z = self.model.encode_continuous(images).permute(0, 2, 3, 1).reshape(-1, self.model.latent_dim)
        self.model.codebook.restart_dead_codes(z, torch.ones(self.model.num_codebook_vectors, dtype=torch.bool))

    def start_gan(self) -> None:
        """Switch the GAN loss on from the next step: for a run on a time budget, which knows when but not at
        which step."""
        self.tp["disc_start"] = min(self.tp["disc_start"], self.step)

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        """One generator step (and one discriminator step once the GAN is on) on a normalized batch; returns the
        losses. A non-finite loss raises FloatingPointError before any weight changes."""
        tp, model = self.tp, self.model
        use_gan = self.step >= tp["disc_start"]
        for opt in (self.opt, self.opt_d):
            for group in opt.param_groups:
                group["lr"] = tp["learning_rate"] * lr_factor(self.step, tp["lr_decay"])
        with autocast(self.device, self.amp):
            z = model.encode_continuous(x)
            z_q, idx, q_loss = model.codebook(z)
            rec = model.decode(z_q).float()
            rec_loss = tp["l1_weight"] * (rec - x).abs().mean() + tp["l2_weight"] * ((rec - x) ** 2).mean()
            loss = rec_loss + q_loss
            if use_gan:
                g_loss = -self.disc(rec).float().mean()
                loss = loss + tp["disc_weight"] * adaptive_gan_weight(rec_loss, g_loss, model.last_layer_weight()) * g_loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss is {loss.item()}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        losses = {"rec_loss": rec_loss.item(), "q_loss": q_loss.item()}
        if use_gan:
            with autocast(self.device, self.amp):
                d_loss = 0.5 * (F.relu(1 - self.disc(x)).mean() + F.relu(1 + self.disc(rec.detach())).mean())
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.float().backward()
            self.opt_d.step()
            losses.update(g_loss=g_loss.item(), d_loss=d_loss.item())
        self.step += 1
        self._restart_dead_codes(z.detach(), idx)
        return losses

    def _restart_dead_codes(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        self.last_used[idx.unique().cpu()] = self.step
        dead = (self.step - self.last_used) > self.tp["dead_code_window"]
        if dead.any():
            self.model.codebook.restart_dead_codes(z.permute(0, 2, 3, 1).reshape(-1, self.model.latent_dim),
                                                   dead.to(self.device))
            self.last_used[dead] = self.step

    def state_dict(self) -> dict[str, Any]:
        """The keys of a stage-1 training state that belong to the trainer (the script adds epoch, RNG, config)."""
        return {"model": self.model.state_dict(), "disc": self.disc.state_dict(), "opt": self.opt.state_dict(),
                "opt_d": self.opt_d.state_dict(), "last_used": self.last_used, "step": self.step}

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        load_state_dict_strict(self.model, state["model"], source=source)
        load_state_dict_strict(self.disc, state["disc"], source=source)
        self.opt.load_state_dict(state["opt"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.last_used, self.step = state["last_used"], state["step"]
