"""Stage 2 of MaskGIT: train the bidirectional transformer by masked visual token modeling (MVTM).

The frozen VQGAN tokenizes the train/val images once (training/token_cache.py: cached, rebuilt only when the images
or the VQGAN weights change); training then only sees token ids. Each step masks ceil(gamma(r)*N) tokens per
image (r ~ U(0,1)) and minimizes the cross-entropy on the masked positions; --train-masks strokes/boxes/mix masks
part of a stroke or box hole instead, in every image or (mix) in a share --hole-mask-prob of them
(training/train_masks.py). --augment shift moves and rescales each training image a little, in one of a few
jitters per image whose token grids are cached beside the token cache (training/augment.py); a config with
pixel_conditioning also feeds the transformer the known pixels of every token's patch (models/Transformer).

    python training_transformer.py              # configs/MaskGit_small_gan.yml on the shipped VQGAN: a CPU finishes it
    python training_transformer.py --resume     # continue it after a stop
    python training_transformer.py --MaskGitConfig configs/MaskGit_lab_small_vqgan.yml --device cuda --batch-size 128 \
        --compile --epochs 300                  # the lab-size transformer, on a GPU
    torchrun --standalone --nproc_per_node 4 training_transformer.py --device cuda --batch-size 64 --compile ...
    python training_transformer.py --MaskGitConfig ... --cache-only     # only tokenize (e.g. on a GPU machine)

A run that outlives its machine (README "Train your own"): --schedule wsd trains a constant-rate trunk after the
warm-up, in sittings (--max-minutes), each continued with --resume, or on another machine with --resume-from
trunk_state.pt (the compact state the trunk writes beside training_state.pt); a cooldown branch decays from it
into its own folder, to rate 0 at its last step, and its EMA is what is evaluated:
    python training_transformer.py --schedule wsd --checkpoint-path ~/runs/trunk --max-minutes 120
    python training_transformer.py --schedule wsd --checkpoint-path ~/runs/trunk --resume --max-minutes 120
    python training_transformer.py --schedule wsd --checkpoint-path ~/runs/cooldown_1 \
        --resume-from ~/runs/trunk/training_state.pt --cooldown-steps 400

--epochs, --batch-size, --learning-rate and --warmup-steps default to the config's train_param section (the
recipe the config is sized for), else to the lab-size recipe (training.transformer.TRAIN_DEFAULTS).

Outputs in --checkpoint-path: transformer_epoch_N.pt and transformer_last.pt (EMA weights, plain state_dicts as
the lab's inpainting loads them), transformer_raw_last.pt (raw weights), training_state.pt (everything --resume
needs; trunk_state.pt too under wsd), log.csv (a row per epoch and per stop), train_steps.csv (a row per step),
sittings.csv (the machine and recipe of each start), a copy of the config, token_cache.pt (unless --token-cache points
elsewhere).
Exit codes: 0 done (or --max-steps reached), 1 non-finite loss or weights (nothing saved after it), 2 user error
(one line; --debug for a traceback), 130 interrupted (Ctrl-C/SIGTERM) after saving a state that --resume continues.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from models.Transformer import BidirectionalTransformer
from models.VQGAN_Transformer import MaskGit, load_maskgit_config
from training.augment import ensure_shifted_tokens, shifted_cache_path
from training.token_cache import ensure_token_cache, image_dataset
from training.transformer import (LOG_FIELDS, TokenData, TransformerTrainer, check_resume, fill_defaults, image_tensor,
                                  training_parser, trains_on_images)
from utils.checkpoint import ensure_writable_dir, load_state_dict_strict, load_training_state, load_weights
from utils.cli import UserError, run_cli
from utils.config import resolve_path
from utils.precision import resolve_amp
from utils.train_utils import (CSVLog, DistEnv, atomic_write_text, cleanup_distributed, on_main_then_share,
                               seed_everything, setup_distributed)

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return training_parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    positive = {"--batch-size": args.batch_size, "--accum-grad": args.accum_grad, "--epochs": args.epochs,
                "--save-per-epoch": args.save_per_epoch, "--learning-rate": args.learning_rate}
    for flag, value in positive.items():
        if value <= 0:
            raise UserError(f"{flag} must be positive, got {value}")
    if not 0.0 < args.partial <= 1.0:
        raise UserError(f"--partial must be in (0, 1], got {args.partial}")
    if not 0 <= args.start_from_epoch < args.epochs:
        raise UserError(f"--start-from-epoch {args.start_from_epoch} must be below --epochs {args.epochs}")
    if not 0.0 <= args.hole_mask_prob <= 1.0:
        raise UserError(f"--hole-mask-prob must be in [0, 1], got {args.hole_mask_prob}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise UserError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if min(args.warmup_steps, args.ckpt_interval, args.max_steps, args.num_workers, args.cooldown_steps,
           args.max_minutes) < 0:
        raise UserError("--warmup-steps, --ckpt-interval, --max-steps, --num_workers, --cooldown-steps and "
                        "--max-minutes must not be negative")
    if args.resume and args.resume_from:
        raise UserError("--resume and --resume-from: pass one (--resume reads training_state.pt in --checkpoint-path)")
    if args.cooldown_steps:
        if args.schedule != "wsd":
            raise UserError("--cooldown-steps branches from a --schedule wsd trunk; pass --schedule wsd")
        if not (args.resume_from or args.resume):
            raise UserError("--cooldown-steps needs the trunk's state: pass --resume-from TRUNK/training_state.pt")
        if args.resume_from and Path(args.resume_from).resolve().parent == Path(args.checkpoint_path).resolve():
            raise UserError("--cooldown-steps writes into --checkpoint-path, which holds the trunk's state: give the "
                            "branch a folder of its own")


def load_state_to_resume(args: argparse.Namespace) -> tuple[dict | None, Path | None]:
    """The training state --resume or --resume-from names (None for a new run), and its path."""
    path = Path(args.resume_from) if args.resume_from else Path(args.checkpoint_path) / "training_state.pt"
    return (load_training_state(path), path) if (args.resume or args.resume_from) else (None, None)


def build_maskgit(args: argparse.Namespace, env: DistEnv, resumed: bool) -> tuple[MaskGit, dict]:
    """The frozen VQGAN and the transformer, with the same initial weights on every rank; with --start-from-epoch
    N (and no state to resume) the transformer starts from transformer_epoch_N.pt."""
    cfg = load_maskgit_config(args.MaskGitConfig)
    maskgit = MaskGit(cfg)
    maskgit.transformer.to(env.device)
    seed_everything(args.seed + env.rank)  # from here on, ranks draw different masks and dropout
    if args.start_from_epoch and not resumed:
        path = Path(args.checkpoint_path) / f"transformer_epoch_{args.start_from_epoch}.pt"
        load_state_dict_strict(maskgit.transformer, load_weights(path), source=str(path))
    return maskgit, cfg


def tokenize_images(args: argparse.Namespace, env: DistEnv, maskgit: MaskGit, cfg: dict) -> Path:
    """The token cache of the train and val images (rank 0 builds it unless it is up to date, the others wait)."""
    cache_path = Path(args.token_cache) if args.token_cache else Path(args.checkpoint_path) / "token_cache.pt"
    vq_ckpt = resolve_path(cfg["VQ_Configs"]["VQ_CKPT_path"])
    on_main_then_share(env, lambda: ensure_token_cache(
        maskgit.vqgan, vq_ckpt, args.train_d_path, args.val_d_path, cache_path, env.device, args.cache_precision,
        args.batch_size, args.num_workers, verbose=env.is_main))
    return cache_path


def tokenize_shifted(args: argparse.Namespace, env: DistEnv, maskgit: MaskGit, cache_path: Path,
                     train_images: np.ndarray) -> Path:
    """The cache of jittered token grids for --augment shift, beside the token cache (rank 0 builds it)."""
    path = shifted_cache_path(cache_path)
    on_main_then_share(env, lambda: ensure_shifted_tokens(maskgit.vqgan, cache_path, image_tensor(train_images),
                                                          env.device, args.batch_size, verbose=env.is_main))
    return path


def training_images(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 train and val images (the token cache's, in its order) for pixel conditioning and --augment."""
    return image_dataset(args.train_d_path, "train").images, image_dataset(args.val_d_path, "val").images


def copy_config(config: str, out: Path) -> None:
    """A copy of the config beside the weights, so that they can be loaded later without guessing."""
    source, copy = resolve_path(config), out / Path(config).name
    if copy.resolve() != source.resolve():
        atomic_write_text(source.read_text(), copy)


def _train(args: argparse.Namespace, env: DistEnv) -> tuple[BidirectionalTransformer, BidirectionalTransformer] | None:
    out = Path(args.checkpoint_path)
    say = print if env.is_main else (lambda *a, **k: None)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    seed_everything(args.seed)  # the same initial weights on every rank

    state, state_path = load_state_to_resume(args)
    if state is not None:  # a wrong flag fails before any work
        check_resume(state, args, env.world_size)
    ensure_writable_dir(out, "--checkpoint-path")
    maskgit, cfg = build_maskgit(args, env, resumed=state is not None)
    cache_path = tokenize_images(args, env, maskgit, cfg)
    if args.cache_only:
        say(f"token cache ready: {cache_path}")
        return None
    images = training_images(args) if trains_on_images(maskgit.transformer, args.augment) else None
    shifted = tokenize_shifted(args, env, maskgit, cache_path, images[0]) if args.augment == "shift" else None
    maskgit.vqgan.cpu()  # never used again in this run
    data = TokenData.from_cache(cache_path, maskgit, args.partial, args.seed, env.device, images, shifted)

    cooldown_start = state.get("cooldown_start", state["step"]) if args.cooldown_steps else None
    trainer = TransformerTrainer(maskgit, data, args, cfg, env, out, cooldown_start=cooldown_start)
    if state is not None:
        trainer.load_state(state, state_path)
        say(f"resuming from {state_path}: epoch {trainer.progress.epoch + 1}, step {trainer.progress.step}")
    elif trainer.state_path.is_file():
        say(f"note: starting a new run in {out}; pass --resume to continue the saved one instead")
    log = CSVLog(out / "log.csv", LOG_FIELDS, keep_until_epoch=trainer.progress.epoch
                 if (state is not None or args.start_from_epoch) else None)
    if env.is_main:
        copy_config(args.MaskGitConfig, out)
    say(trainer.summary())
    return trainer.fit(log, say)


def train(args: argparse.Namespace) -> tuple[BidirectionalTransformer, BidirectionalTransformer] | None:
    """The whole run in one process of a (possibly single-process) job; returns the raw and the EMA transformer
    (None with --cache-only)."""
    fill_defaults(args)
    check_args(args)
    env = setup_distributed(args.device)
    try:
        args.amp = resolve_amp(args.amp, env.device)
        with torch.autograd.set_detect_anomaly(args.detect_anomaly):  # restored afterwards, for in-process callers
            return _train(args, env)
    finally:
        cleanup_distributed()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: train(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
