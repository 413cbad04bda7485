"""Stage 1: train the VQGAN tokenizer (the lab ships its weights; they are not public, so we train our own).

Loss = L1 + L2 reconstruction + codebook/commitment loss, plus a PatchGAN hinge loss switched on after
`disc_start` steps with the adaptive weight of Esser et al. (ratio of gradient norms at the last decoder
layer). Codes unused for `dead_code_window` steps are moved onto recent encoder outputs, and the codebook
starts from encoder outputs, so the 1024 codes stay in use.

    python training_vqgan.py --config configs/VQGAN_small.yml --checkpoint-path checkpoints/VQGAN_small
    python training_vqgan.py ... --resume        # continue from checkpoints/VQGAN_small/training_state.pt
    python training_vqgan.py ... --init-from pretrained/VQGAN_small/VQGAN.pt   # a new run from shipped weights

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
from tqdm import tqdm

from models.VQGAN import load_vqgan_config
from training.vqgan import TRAIN_DEFAULTS, VQGANTrainer, load_images, random_hflip, validate
from utils.checkpoint import (TRAINING_STATE_TAG, atomic_save, ensure_writable_dir, load_state_dict_strict, load_training_state,
                              load_weights, rng_state, set_rng_state)
from utils.cli import EXIT_INTERRUPTED, TrainingStopped, UserError, run_cli
from utils.config import load_config
from utils.precision import AMP_CHOICES
from utils.train_utils import CSVLog, GracefulInterrupt, atomic_write_text, check_finite_weights, diverged, seed_everything

LOG_FIELDS = ["epoch", "step", "train_rec_loss", "train_q_loss", "train_g_loss", "train_d_loss", "val_psnr",
              "codebook_usage", "perplexity", "images_per_s", "seconds"]
LOSS_KEYS = ["rec_loss", "q_loss", "g_loss", "d_loss"]


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
    p.add_argument("--lr-decay", type=int, nargs=2, default=None, metavar=("START", "END"),
                   help="cosine decay of the learning rate from step START to 5%% of it at step END (e.g. the last "
                        "steps of a run, to settle the weights); pass the same values when resuming")
    p.add_argument("--partial", type=float, default=1.0, help="fraction of the training set to use")
    p.add_argument("--ckpt-interval", type=int, default=500, help="write a training state every N steps")
    p.add_argument("--amp", choices=AMP_CHOICES, default="auto", help="bf16 autocast, none (fp32), or auto: bf16 where it is faster")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from training_state.pt in --checkpoint-path")
    p.add_argument("--init-from", default=None, metavar="VQGAN.pt",
                   help="start from these weights (e.g. a shipped fp16 VQGAN.pt) with fresh optimizers and discriminator")
    p.add_argument("--detect-anomaly", action="store_true", help="torch.autograd anomaly detection (slow)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def training_params(cfg: dict, args: argparse.Namespace) -> dict:
    """The config's train_param with the flags that override it."""
    tp = {**TRAIN_DEFAULTS, **(cfg.get("train_param") or {})}
    for key, flag in [("batch_size", args.batch_size), ("learning_rate", args.learning_rate),
                      ("disc_start", args.disc_start), ("lr_decay", args.lr_decay)]:
        if flag is not None:
            tp[key] = flag
    return tp


def run(args: argparse.Namespace) -> None:
    cfg = load_config(args.config)
    model_cfg = load_vqgan_config(args.config)
    tp = training_params(cfg, args)
    if not 0 < args.partial <= 1:
        raise UserError(f"--partial {args.partial}: must be in (0, 1]")
    if args.lr_decay is not None and not 0 <= args.lr_decay[0] < args.lr_decay[1]:
        raise UserError(f"--lr-decay {args.lr_decay[0]} {args.lr_decay[1]}: need 0 <= START < END")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available; use --device cpu")
    out = Path(args.checkpoint_path)
    state_path = out / "training_state.pt"
    if args.resume and args.init_from:
        raise UserError("--init-from starts a new run and --resume continues one: pass only one of them")
    state = load_training_state(state_path) if args.resume else None  # a bad --resume fails before any work
    init_weights = load_weights(args.init_from) if args.init_from else None
    ensure_writable_dir(out, "--checkpoint-path")
    seed_everything(args.seed)

    train = load_images(args.train_d_path, "train", device)
    train = train[: max(1, int(len(train) * args.partial))]
    val = load_images(args.val_d_path, "val", device)
    bs = int(tp["batch_size"])
    steps_per_epoch = max(1, len(train) // bs)
    print(f"train {len(train)} images, val {len(val)}, {steps_per_epoch} steps/epoch, batch {bs}, "
          f"GAN loss from step {tp['disc_start']}")

    trainer = VQGANTrainer(model_cfg, tp, device, args.amp)
    epoch, sums, n = 0, torch.zeros(len(LOSS_KEYS)), 0
    if state is not None:
        trainer.load_state_dict(state, source=str(state_path))
        epoch = state["epoch"]
        sums, n = state.get("epoch_sums", (sums, n))  # the running losses of a resumed epoch, for its log row
        sums = torch.cat([sums, torch.zeros(len(LOSS_KEYS) - len(sums))])  # states from before the GAN columns
        set_rng_state(state["rng"])
        print(f"resumed from {state_path}: epoch {epoch}, step {trainer.step}")
    elif init_weights is not None:
        load_state_dict_strict(trainer.model, init_weights, source=args.init_from)
        print(f"initialized from {args.init_from}")
    else:
        trainer.init_codebook(train[torch.randperm(len(train))[:64]])
    if not (out / "VQGAN.yml").exists() or not args.resume:
        atomic_write_text(Path(args.config).read_text(), out / "VQGAN.yml")
    log = CSVLog(out / "log.csv", LOG_FIELDS, keep_until_epoch=epoch if args.resume else None)

    def save() -> None:
        check_finite_weights(trainer.model, trainer.step, state_path)
        atomic_save({"format": TRAINING_STATE_TAG, **trainer.state_dict(), "epoch": epoch, "epoch_sums": (sums, n),
                     "rng": rng_state(), "config": cfg}, state_path)
        atomic_save({k: v.half() for k, v in trainer.model.state_dict().items()}, out / "VQGAN.pt")

    t_start = time.time()

    def out_of_time() -> bool:
        return args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes

    with GracefulInterrupt() as interrupt:
        while epoch < args.epochs and (args.max_steps is None or trainer.step < args.max_steps):
            # the permutation of each epoch comes from (seed, epoch): a resumed epoch replays the same order
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
            t_epoch, n_start, completed = time.time(), n, False
            bar = tqdm(range(trainer.step - epoch * steps_per_epoch, steps_per_epoch), desc=f"epoch {epoch}", leave=False)
            for i in bar:
                x = random_hflip(train[order[i * bs:(i + 1) * bs]])
                try:
                    losses = trainer.train_step(x)
                except FloatingPointError as e:
                    raise diverged(str(e), trainer.step + 1, state_path) from None
                sums += torch.tensor([losses.get(k, 0.0) for k in LOSS_KEYS])
                n += 1
                bar.set_postfix(rec=f"{losses['rec_loss']:.4f}", q=f"{losses['q_loss']:.4f}", gan=int("g_loss" in losses))
                if trainer.step % args.ckpt_interval == 0 or interrupt.requested or out_of_time():
                    save()
                if interrupt.requested:
                    raise TrainingStopped(f"interrupted at step {trainer.step}: saved {state_path}; continue with "
                                          "--resume", EXIT_INTERRUPTED)
                if out_of_time() or (args.max_steps is not None and trainer.step >= args.max_steps):
                    break
            else:
                epoch, completed = epoch + 1, True
            seconds = time.time() - t_epoch
            means = {f"train_{k}": (s / max(n, 1)).item() for k, s in zip(LOSS_KEYS, sums)}
            row = {"epoch": epoch, "step": trainer.step, **means, **validate(trainer.model, val, bs, args.amp),
                   "images_per_s": (n - n_start) * bs / max(seconds, 1e-9), "seconds": seconds}
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            if completed:  # a stopped epoch gets its row when --resume completes it, as in an uninterrupted run
                log.write(row)
                sums, n = torch.zeros(len(LOSS_KEYS)), 0
            save()
            if out_of_time():
                break
    print(f"done: {out / 'VQGAN.pt'} after {trainer.step} steps ({(time.time() - t_start) / 60:.1f} min)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with torch.autograd.set_detect_anomaly(args.detect_anomaly):  # restored afterwards, for in-process callers
        return run_cli(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
