"""Stage 1: train the VQGAN tokenizer (the lab ships its weights; they are not public, so we train our own).

Loss = L1 + L2 reconstruction + codebook/commitment loss, plus a PatchGAN hinge loss switched on after
`disc_start` steps with the adaptive weight of Esser et al. (ratio of gradient norms at the last decoder
layer). Codes unused for `dead_code_window` steps are moved onto recent encoder outputs, and the codebook
starts from encoder outputs, so the 1024 codes stay in use.

    python training_vqgan.py --config configs/VQGAN_small.yml --checkpoint-path checkpoints/VQGAN_small
    python training_vqgan.py ... --resume        # continue from checkpoints/VQGAN_small/training_state.pt

Writes VQGAN.pt (a plain fp16 state_dict that VQGAN(cfg) loads strictly), VQGAN.yml (the config that made
it), training_state.pt (model, discriminator, optimizers, step, RNG) and log.csv (one row per completed epoch).
Exit codes: 0 done, 1 non-finite loss or weights (nothing saved after it), 2 user error (one line; --debug for a
traceback), 130 interrupted by Ctrl-C/SIGTERM after saving a training state that --resume continues exactly.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.VQGAN import VQGAN, load_vqgan_config
from models.VQGAN.discriminator import Discriminator
from utils.checkpoint import (TRAINING_STATE_TAG, atomic_save, ensure_writable_dir, load_state_dict_strict,
                              load_training_state, rng_state, set_rng_state)
from utils.config import load_config
from utils.data import ImageFolderDataset
from utils.image import denormalize, normalize, uint8_to_tensor
from utils.train_utils import (EXIT_INTERRUPTED, CSVLog, GracefulInterrupt, TrainingStopped, UserError,
                               atomic_write_text, autocast, check_finite_weights, diverged, run_cli,
                               seed_everything)

TRAIN_DEFAULTS = dict(batch_size=32, learning_rate=2e-4, betas=[0.5, 0.9], weight_decay=0.0, l1_weight=1.0,
                      l2_weight=1.0, disc_start=4000, disc_weight=0.1, disc_base_channels=64, dead_code_window=200)
LOG_FIELDS = ["epoch", "step", "train_rec_loss", "train_q_loss", "val_psnr", "codebook_usage", "perplexity",
              "images_per_s", "seconds"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/VQGAN_small.yml", help="YAML with model_param (and train_param)")
    p.add_argument("--train_d_path", default="./cat_face/train/")
    p.add_argument("--val_d_path", default="./cat_face/val/")
    p.add_argument("--checkpoint-path", default="./checkpoints/VQGAN_small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this wall time")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--disc-start", type=int, default=None, help="step at which the GAN loss starts")
    p.add_argument("--partial", type=float, default=1.0, help="fraction of the training set to use")
    p.add_argument("--ckpt-interval", type=int, default=500, help="write a training state every N steps")
    p.add_argument("--amp", choices=["bf16", "none"], default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from training_state.pt in --checkpoint-path")
    p.add_argument("--detect-anomaly", action="store_true", help="torch.autograd anomaly detection (slow)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def load_images(folder: str, split: str, device: torch.device) -> torch.Tensor:
    """A whole split as one normalized tensor (7k images are 340 MB in fp32), channels_last for fast convs."""
    try:
        images = ImageFolderDataset(folder, split=split).images
    except ValueError as e:
        raise UserError(str(e)) from e
    return normalize(uint8_to_tensor(images), split).to(device).contiguous(memory_format=torch.channels_last)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [0,1] images."""
    mse = ((x - y) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


@torch.no_grad()
def validate(model: VQGAN, images: torch.Tensor, batch_size: int, amp: str) -> dict[str, float]:
    """Reconstruction PSNR (in [0,1] pixel space) and codebook usage/perplexity on the validation set."""
    model.eval()
    psnrs, counts = [], torch.zeros(model.num_codebook_vectors)
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        with autocast(x.device, amp):
            rec, idx, _ = model(x)
        psnrs.append(psnr(denormalize(rec.float()), denormalize(x)))
        counts += torch.bincount(idx.cpu(), minlength=model.num_codebook_vectors).float()
    model.train()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"val_psnr": torch.cat(psnrs).mean().item(), "codebook_usage": (counts > 0).float().mean().item(),
            "perplexity": entropy.exp().item()}


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """Scale the GAN gradient to the size of the reconstruction gradient at the decoder's last layer."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def run(args: argparse.Namespace) -> None:
    cfg = load_config(args.config)
    model_cfg = load_vqgan_config(args.config)
    tp = {**TRAIN_DEFAULTS, **(cfg.get("train_param") or {})}
    for key, flag in [("batch_size", args.batch_size), ("learning_rate", args.learning_rate),
                      ("disc_start", args.disc_start)]:
        if flag is not None:
            tp[key] = flag
    if not 0 < args.partial <= 1:
        raise UserError(f"--partial {args.partial}: must be in (0, 1]")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available; use --device cpu")
    out = Path(args.checkpoint_path)
    state_path = out / "training_state.pt"
    state = load_training_state(state_path) if args.resume else None  # a bad --resume fails before any work
    ensure_writable_dir(out, "--checkpoint-path")
    seed_everything(args.seed)

    train = load_images(args.train_d_path, "train", device)
    train = train[: max(1, int(len(train) * args.partial))]
    val = load_images(args.val_d_path, "val", device)
    bs = int(tp["batch_size"])
    steps_per_epoch = max(1, len(train) // bs)
    print(f"train {len(train)} images, val {len(val)}, {steps_per_epoch} steps/epoch, batch {bs}")

    model = VQGAN(model_cfg).to(device, memory_format=torch.channels_last)
    disc = Discriminator(model_cfg["image_channels"], int(tp["disc_base_channels"])).to(
        device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=tp["learning_rate"], betas=tuple(tp["betas"]),
                            weight_decay=tp["weight_decay"])
    opt_d = torch.optim.AdamW(disc.parameters(), lr=tp["learning_rate"], betas=tuple(tp["betas"]),
                              weight_decay=tp["weight_decay"])
    K = model.num_codebook_vectors
    last_used = torch.zeros(K, dtype=torch.long)
    step, epoch, sums, n = 0, 0, torch.zeros(2), 0
    if state is not None:
        load_state_dict_strict(model, state["model"], source=str(state_path))
        load_state_dict_strict(disc, state["disc"], source=str(state_path))
        opt.load_state_dict(state["opt"])
        opt_d.load_state_dict(state["opt_d"])
        last_used, step, epoch = state["last_used"], state["step"], state["epoch"]
        sums, n = state.get("epoch_sums", (sums, n))  # the running loss of a resumed epoch, for its log row
        set_rng_state(state["rng"])
        print(f"resumed from {state_path}: epoch {epoch}, step {step}")
    else:
        with torch.no_grad():  # codebook starts on encoder outputs: no code is born dead
            z = model.encode_continuous(train[torch.randperm(len(train))[:64]]).permute(0, 2, 3, 1).reshape(-1, model.latent_dim)
            model.codebook.restart_dead_codes(z, torch.ones(K, dtype=torch.bool))
    if not (out / "VQGAN.yml").exists() or not args.resume:
        atomic_write_text(Path(args.config).read_text(), out / "VQGAN.yml")
    log = CSVLog(out / "log.csv", LOG_FIELDS, keep_until_epoch=epoch if args.resume else None)

    def save(weights_too: bool) -> None:
        check_finite_weights(model, step, state_path)
        atomic_save({"format": TRAINING_STATE_TAG, "model": model.state_dict(), "disc": disc.state_dict(),
                     "opt": opt.state_dict(), "opt_d": opt_d.state_dict(), "last_used": last_used,
                     "step": step, "epoch": epoch, "epoch_sums": (sums, n), "rng": rng_state(), "config": cfg},
                    state_path)
        if weights_too:
            atomic_save({k: v.half() for k, v in model.state_dict().items()}, out / "VQGAN.pt")

    t_start = time.time()
    with GracefulInterrupt() as interrupt:
        while epoch < args.epochs and (args.max_steps is None or step < args.max_steps):
            # the permutation of each epoch comes from (seed, epoch): a resumed epoch replays the same order
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
            start_in_epoch = step - epoch * steps_per_epoch
            t_epoch, n_start, completed = time.time(), n, False
            bar = tqdm(range(start_in_epoch, steps_per_epoch), desc=f"epoch {epoch}", leave=False)
            for i in bar:
                x = train[order[i * bs:(i + 1) * bs]]
                flip = torch.rand(len(x), device=device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                use_gan = step >= tp["disc_start"]
                with autocast(device, args.amp):
                    z = model.encode_continuous(x)
                    z_q, idx, q_loss = model.codebook(z)
                    rec = model.decode(z_q).float()
                    rec_loss = tp["l1_weight"] * (rec - x).abs().mean() + tp["l2_weight"] * ((rec - x) ** 2).mean()
                    loss = rec_loss + q_loss
                    if use_gan:
                        g_loss = -disc(rec).float().mean()
                        loss = loss + tp["disc_weight"] * adaptive_gan_weight(
                            rec_loss, g_loss, model.last_layer_weight()) * g_loss
                if not torch.isfinite(loss):
                    raise diverged(f"the training loss is {loss.item()}", step + 1, state_path)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if use_gan:
                    with autocast(device, args.amp):
                        d_loss = 0.5 * (F.relu(1 - disc(x)).mean() + F.relu(1 + disc(rec.detach())).mean())
                    opt_d.zero_grad(set_to_none=True)
                    d_loss.float().backward()
                    opt_d.step()
                step += 1
                last_used[idx.unique().cpu()] = step
                dead = (step - last_used) > tp["dead_code_window"]
                if dead.any():
                    model.codebook.restart_dead_codes(z.detach().permute(0, 2, 3, 1).reshape(-1, model.latent_dim), dead.to(device))
                    last_used[dead] = step
                sums += torch.tensor([rec_loss.item(), q_loss.item()])
                n += 1
                bar.set_postfix(rec=f"{rec_loss.item():.4f}", q=f"{q_loss.item():.4f}", gan=int(use_gan))
                out_of_time = args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes
                if step % args.ckpt_interval == 0 or interrupt.requested or out_of_time:
                    save(weights_too=True)
                if interrupt.requested:
                    raise TrainingStopped(f"interrupted at step {step}: saved {state_path}; continue with --resume",
                                          EXIT_INTERRUPTED)
                if out_of_time or (args.max_steps is not None and step >= args.max_steps):
                    break
            else:
                epoch, completed = epoch + 1, True
            seconds = time.time() - t_epoch
            metrics = validate(model, val, bs, args.amp)
            row = {"epoch": epoch, "step": step, "train_rec_loss": (sums[0] / max(n, 1)).item(),
                   "train_q_loss": (sums[1] / max(n, 1)).item(), **metrics,
                   "images_per_s": (n - n_start) * bs / max(seconds, 1e-9), "seconds": seconds}
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            if completed:  # a stopped epoch gets its row when --resume completes it, as in an uninterrupted run
                log.write(row)
                sums, n = torch.zeros(2), 0
            save(weights_too=True)
            if args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes:
                break
    print(f"done: {out / 'VQGAN.pt'} after {step} steps ({(time.time() - t_start) / 60:.1f} min)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with torch.autograd.set_detect_anomaly(args.detect_anomaly):  # restored afterwards, for in-process callers
        return run_cli(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
