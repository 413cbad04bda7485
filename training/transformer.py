"""Stage-2 training steps: the run's settings, its token data, and a trainer that runs epochs, validates, saves
and resumes exactly.

training_transformer.py strings these together; a GPU campaign or a benchmark can use the same pieces. Every
rank of a torchrun job runs the same code: each draws its own masks and dropout, gradients are averaged by DDP,
and rank 0 alone writes files. A training state holds everything a resume needs (weights, EMA, optimizer,
schedule, position in the epoch, every rank's RNG), so a resumed run ends with the weights of an uninterrupted one.
Under the warmup-stable-decay schedule (--schedule wsd) the constant-rate trunk also writes a compact state that
another machine continues (see compact_state), and cooldown branches decay from a trunk's state into their own folder.
"""
from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from models.Transformer import BidirectionalTransformer
from models.VQGAN_Transformer import MaskGit, masked_correct
from sampler.latent_mask import pixel_known_of_tokens
from training.augment import AUGMENTATIONS, DEFAULT_AUGMENT, jitter, load_shifted_tokens
from training.token_cache import load_token_cache
from training.train_masks import (DEFAULT_HOLE_MASK_PROB, DEFAULT_TRAIN_MASKS, TRAIN_MASKS, TrainingMasks,
                                  latent_holes, val_holes)
from utils.checkpoint import TRAINING_STATE_TAG, atomic_save, load_state_dict_strict, rng_state, set_rng_state
from utils.cli import EXIT_INTERRUPTED, OneLineParser, TrainingStopped, UserError
from utils.config import ConfigError, load_config
from utils.image import normalize
from utils.precision import autocast, device_name
from utils.train_utils import (EMA, CSVLog, DistEnv, GracefulInterrupt, StepLog, all_gather_object, all_reduce_sum,
                               atomic_write_text, check_finite_weights, diverged, keep_freed_memory, warmup_cosine,
                               warmup_stable_decay)

# val_loss/val_acc: the fixed uniform MVTM masks; val_hole_*: the fixed whole-hole masks; kind: "epoch" (its end),
# "stop" (--max-steps or --max-minutes) or "cooldown" (a cooldown branch's last step). Later columns were added
# last, so that the older columns keep their places. `epoch` counts completed epochs.
LOG_FIELDS = ["epoch", "step", "train_loss", "val_loss", "val_acc", "lr", "seconds", "val_hole_loss", "val_hole_acc",
              "kind"]
# flags that shape the sequence of batches and rates; --resume refuses to continue a run with different values
RUN_SHAPE_FLAGS = ["batch_size", "accum_grad", "partial", "seed", "start_from_epoch", "train_masks", "hole_mask_prob",
                   "schedule"]
# flags that --resume keeps but --resume-from may change: a branch of a run on other data (e.g. a study's arm
# continuing a trunk with --augment shift)
BRANCH_FLAGS = ["augment"]
# flags added after training states were first saved: a state without one ran with this value
LATER_FLAGS = {"train_masks": DEFAULT_TRAIN_MASKS, "hole_mask_prob": DEFAULT_HOLE_MASK_PROB, "schedule": "cosine",
               "augment": DEFAULT_AUGMENT}
SCHEDULES = ("cosine", "wsd")
COMPACT_STATE_NAME = "trunk_state.pt"  # the WSD trunk's state for another machine (compact_state)
# the recipe for the lab-size transformer; a config's optional train_param section replaces it for the model it
# sizes (configs/MaskGit_small_gan.yml: what a CPU finishes), and flags replace both
TRAIN_DEFAULTS: dict[str, int | float] = {"epochs": 100, "batch_size": 32, "learning_rate": 1e-4, "warmup_steps": 1000}
VAL_MASK_SEED = 1234  # validation masks are drawn once, so val numbers compare across epochs and runs


def train_defaults(config_path: str | Path) -> dict[str, int | float]:
    """TRAIN_DEFAULTS, updated by the config's train_param section; a misspelled or mistyped key is refused."""
    section = load_config(config_path).get("train_param") or {}
    for key, value in section.items():
        if key not in TRAIN_DEFAULTS:
            raise ConfigError(f"{config_path}: train_param.{key} is not a setting of training_transformer.py; "
                              f"use {', '.join(TRAIN_DEFAULTS)}")
        number = (int, float) if key == "learning_rate" else int
        if isinstance(value, bool) or not isinstance(value, number):
            raise ConfigError(f"{config_path}: train_param.{key} is {value!r}; it must be a number"
                              f"{'' if key == 'learning_rate' else ' without decimals'}")
    return {**TRAIN_DEFAULTS, **section}


DEFAULT_CONFIG = "configs/MaskGit_small_gan.yml"  # the shipped VQGAN's tokens, a transformer a CPU trains
WSD_EPOCHS = 10 ** 6  # a wsd trunk's --epochs unless given: no end of its own


def training_parser() -> OneLineParser:
    """The flags of training_transformer.py: their defaults are the recipe, which the benchmark's step shares."""
    p = OneLineParser(description="MaskGIT stage 2: train the bidirectional transformer (MVTM).")
    # the lab's flags
    p.add_argument("--train_d_path", default="./cat_face/train/", help="folder of training images")
    p.add_argument("--val_d_path", default="./cat_face/val/", help="folder of validation images")
    p.add_argument("--checkpoint-path", default="./transformer_checkpoints", help="folder for weights, state, log")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (under torchrun each rank takes cuda:LOCAL_RANK)")
    p.add_argument("--num_workers", type=int, default=4, help="image loading workers while building the token cache")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per micro-batch per process (default: the config's train_param, else 32)")
    p.add_argument("--partial", type=float, default=1.0, help="fraction of the training images used (fixed subset)")
    p.add_argument("--accum-grad", type=int, default=1, help="micro-batches accumulated per optimizer step")
    p.add_argument("--epochs", type=int, default=None,
                   help="total epochs; the cosine schedule spans them (default: the config's train_param, else 100; "
                        "with --schedule wsd: no limit)")
    p.add_argument("--save-per-epoch", type=int, default=1, help="write transformer_epoch_N.pt every N epochs")
    p.add_argument("--start-from-epoch", type=int, default=0,
                   help="load transformer_epoch_N.pt and train epochs N+1..--epochs (new optimizer and schedule; "
                        "--resume continues exactly instead, also a run that was started this way)")
    p.add_argument("--ckpt-interval", type=int, default=0,
                   help="also write training_state.pt every N optimizer steps (0: at the end of every epoch only)")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="peak learning rate (default: the config's train_param, else 1e-4)")
    p.add_argument("--MaskGitConfig", default=DEFAULT_CONFIG,
                   help="MaskGit YAML config (configs/MaskGit.yml: the lab's structure, which needs the lab's VQGAN)")
    # beyond the lab
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue exactly from training_state.pt in --checkpoint-path")
    p.add_argument("--resume-from", default=None, metavar="STATE",
                   help="continue from this training state (training_state.pt, or a trunk's compact trunk_state.pt "
                        "from another machine), writing into --checkpoint-path")
    p.add_argument("--schedule", choices=list(SCHEDULES), default="cosine",
                   help="cosine: warm-up, then cosine to 0 over --epochs; wsd: warm-up, then a constant rate (the "
                        "trunk, which runs until --max-steps, --max-minutes or Ctrl-C) and --cooldown-steps branches")
    p.add_argument("--cooldown-steps", type=int, default=0,
                   help="with --schedule wsd and --resume-from a trunk's state: a branch of this many steps, the rate "
                        "falling as 1 - sqrt to 0 at its last step, written into --checkpoint-path (its EMA restarts "
                        "from the trunk's weights)")
    p.add_argument("--max-minutes", type=float, default=0,
                   help="stop after this many minutes of training in this process, saving a state (0: no limit)")
    p.add_argument("--weight-decay", type=float, default=0.045)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.96))
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps, then cosine decay to 0 (default: the config's train_param, else 1000)")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--train-masks", choices=list(TRAIN_MASKS), default=DEFAULT_TRAIN_MASKS,
                   help="uniform: MaskGIT's random tokens anywhere; strokes/boxes: a random part (gamma-scheduled) "
                        "of a stroke/box hole's tokens; mix: a hole (stroke or box 50/50) with probability "
                        "--hole-mask-prob, else uniform")
    p.add_argument("--hole-mask-prob", type=float, default=DEFAULT_HOLE_MASK_PROB,
                   help="with --train-masks mix: the probability that a sample is masked inside a hole")
    p.add_argument("--augment", choices=list(AUGMENTATIONS), default=DEFAULT_AUGMENT,
                   help="flip: the token cache's images and their mirror images; shift: each also moved by up to 3 "
                        "pixels and zoomed by up to 10 %%, in one of a few jitters per image tokenized once "
                        "(training/augment.py)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: off)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights, used for validation and saved")
    p.add_argument("--amp", choices=["auto", "bf16", "none"], default="auto",
                   help="bf16 autocast or fp32 (none); auto: bf16 where the device has fast bf16 kernels (CUDA, "
                        "AVX-512 CPUs), else fp32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (about 1.9x faster steps on an H100; slow first step)")
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop after this many optimizer steps in total, saving a state (0: no limit); the LR "
                        "schedule still spans --epochs, so a later --resume continues it exactly")
    p.add_argument("--token-cache", default=None, help="token cache file (default: CHECKPOINT_PATH/token_cache.pt)")
    p.add_argument("--cache-precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="VQGAN encoder precision for the cache; auto = bf16 if it matches fp32 on >= 99.9%% of tokens")
    p.add_argument("--cache-only", action="store_true",
                   help="build (or verify) the token cache and exit, e.g. on a GPU machine before training elsewhere")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--detect-anomaly", action="store_true", help="torch.autograd anomaly detection (slow)")
    return p


def fill_defaults(args: argparse.Namespace) -> None:
    """The flags left unset take the config's recipe (train_defaults); a wsd trunk has no end."""
    if args.schedule == "wsd" and args.epochs is None:
        args.epochs = WSD_EPOCHS
    for key, value in train_defaults(args.MaskGitConfig).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def check_resume(state: dict[str, Any], args: argparse.Namespace, world_size: int) -> None:
    """Refuse to continue a saved run with flags that would change its sequence of batches or its schedule. A run
    started with --start-from-epoch N resumes with --resume alone: N is taken from the saved state."""
    saved = {**LATER_FLAGS, **state["args"]}
    if "cooldown_start" in state and not args.cooldown_steps:
        raise UserError("--resume: this state is a cooldown branch's; continue the trunk from the trunk's state, or "
                        "finish the branch with its --cooldown-steps")
    if not args.start_from_epoch:
        args.start_from_epoch = saved["start_from_epoch"]
    for flag in RUN_SHAPE_FLAGS + (BRANCH_FLAGS if args.resume else []):
        if saved[flag] != getattr(args, flag):
            raise UserError(f"--resume: --{flag.replace('_', '-')} was {saved[flag]} in the saved run, "
                            f"now {getattr(args, flag)}; pass the same value")
    if state["world_size"] != world_size:
        raise UserError(f"--resume: the saved run used {state['world_size']} processes, now {world_size}")


def image_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images [N, H, W, 3] (utils.data's arrays) -> uint8 [N, 3, H, W]: a quarter of the memory of floats."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


@dataclass
class TokenData:
    """What training reads, on the training device: the training sequences (a fixed --partial subset, and the
    flipped copy of each) and the validation tokens with their fixed masks: uniform MVTM masks, and (when asked
    for: drawing the strokes takes seconds) whole-hole masks (training.train_masks.val_holes).

    With images (pixel conditioning or --augment shift): `train_images` uint8 [n, 3, H, W], the subset's images
    (sequence r >= n is image r - n flipped), `val_images` and the val holes' known pixels `val_hole_known`. With
    --augment shift: `shifted` [V, 2n, N], the cached jittered token grids of each training sequence, and
    `shift_jitters` [V, 2n, 3], their jitters (training.augment)."""
    train: torch.Tensor
    val_target: torch.Tensor
    val_mask: torch.Tensor
    val_hole_mask: torch.Tensor | None = None
    train_images: torch.Tensor | None = None
    val_images: torch.Tensor | None = None
    val_hole_known: torch.Tensor | None = None
    shifted: torch.Tensor | None = None
    shift_jitters: torch.Tensor | None = None

    @classmethod
    def from_cache(cls, cache_path: str | Path, maskgit: MaskGit, partial: float, seed: int, device: torch.device,
                   images: tuple[np.ndarray, np.ndarray] | None = None,
                   shifted_path: str | Path | None = None) -> "TokenData":
        """A token cache's tokens, with both kinds of val masks (training_transformer.py logs both), with `images`
        (the uint8 train and val images the cache was built from) the pixels, and with `shifted_path` (its
        training.augment.ensure_shifted_tokens) the jittered grids."""
        cache = load_token_cache(cache_path)
        shifted = load_shifted_tokens(shifted_path) if shifted_path else None
        return cls.from_tokens(cache.train, cache.train_flip, cache.val, maskgit, partial, seed, device, holes=True,
                               images=images, shifted=shifted)

    @classmethod
    def from_tokens(cls, train: torch.Tensor, train_flip: torch.Tensor, val: torch.Tensor, maskgit: MaskGit,
                    partial: float, seed: int, device: torch.device, holes: bool = False,
                    images: tuple[np.ndarray, np.ndarray] | None = None,
                    shifted: tuple[torch.Tensor, torch.Tensor] | None = None) -> "TokenData":
        """Token ids of train, of its mirror images and of val (e.g. a token cache's, or tokens made in memory),
        optionally their uint8 images (train, val) [N, H, W, 3] and the jittered grids of train and its mirror
        images with their jitters (training.augment.load_shifted_tokens)."""
        subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        subset = subset[:max(1, round(partial * len(train)))].to(train.device)
        for tokens, pixels in zip((train, val), images or ()):
            if len(tokens) != len(pixels):
                raise UserError(f"{len(pixels)} images against {len(tokens)} token sequences: the token cache was "
                                f"built from other images; pass the folders it was built from")
        data = cls.for_validation(val, maskgit, device, holes, images[1] if images else None)
        train_images = image_tensor(images[0])[subset.cpu()].to(device) if images else None
        data = replace(data, train=torch.cat([train[subset], train_flip[subset]]).to(device),
                       train_images=train_images)
        if shifted is None:
            return data
        tokens, jitters = shifted
        if tokens.shape[1] != 2 * len(train):
            raise UserError(f"the shifted token cache has {tokens.shape[1]} training sequences against the token "
                            f"cache's {2 * len(train)}: delete it to rebuild it")
        sequences = torch.cat([subset, subset + len(train)]).cpu()
        return replace(data, shifted=tokens[:, sequences].to(device), shift_jitters=jitters[:, sequences].to(device))

    @classmethod
    def for_validation(cls, val: torch.Tensor, maskgit: MaskGit, device: torch.device, holes: bool = False,
                       images: np.ndarray | None = None) -> "TokenData":
        """The val tokens with their fixed masks and no training sequences: to validate a trained transformer
        (with `images`, uint8 [N, H, W, 3], one with pixel conditioning)."""
        mask = maskgit.mask_tokens(val.long(), torch.Generator().manual_seed(VAL_MASK_SEED))[1]
        hole_mask = hole_known = None
        if holes:
            pixel_holes = val_holes(len(val))
            hole_mask = latent_holes(pixel_holes, maskgit.latent_resolution).to(device)
            hole_known = torch.from_numpy(~pixel_holes)[:, None].to(device)
        val_images = image_tensor(images).to(device) if images is not None else None
        return cls(val[:0].to(device), val.to(device), mask.to(device), hole_mask, val_images=val_images,
                   val_hole_known=hole_known)


def trains_on_images(transformer: BidirectionalTransformer, augment: str) -> bool:
    """Whether training reads the images beside the tokens: for pixel conditioning, or to jitter them."""
    return transformer.pixel_conditioning or augment == "shift"


def normalized(images: torch.Tensor, split: str) -> torch.Tensor:
    """uint8 images [B, 3, H, W] -> float, in the lab's normalized space of `split` (utils.image)."""
    return normalize(images.float().div_(255), split)


@torch.no_grad()
def validate(model: BidirectionalTransformer, data: TokenData, batch_size: int, env: DistEnv,
             amp: str, holes: bool = False) -> tuple[float, float]:
    """(cross-entropy without label smoothing, accuracy) over the masked val tokens, split over the ranks: those of
    the fixed uniform masks, or with `holes` those of the fixed whole-hole masks."""
    model.eval()
    masks = data.val_hole_mask if holes else data.val_mask
    if model.pixel_conditioning and data.val_images is None:
        raise UserError("this transformer has pixel_conditioning: its validation needs the val images")
    loss_sum = correct = count = 0.0
    for i in range(env.rank * batch_size, len(data.val_target), env.world_size * batch_size):
        t, m = data.val_target[i:i + batch_size].long(), masks[i:i + batch_size]
        pixels = None
        if model.pixel_conditioning:  # the uniform masks hide whole patches; the holes their own pixels
            images = normalized(data.val_images[i:i + batch_size], "val")
            known = data.val_hole_known[i:i + batch_size] if holes else pixel_known_of_tokens(~m, images.shape[-1])
            pixels = (images, known)
        with autocast(env.device, amp):
            logits = model(t.masked_fill(m, model.mask_token_id), pixels=pixels)
        c, n = masked_correct(logits, t, m)
        loss_sum += MaskGit.loss(logits, t, m).item() * n
        correct, count = correct + c, count + n
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], env)
    return loss_sum / count, correct / count


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def compact_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A training state small enough to commit at the end of each sitting (5 bytes a parameter, not 16): fp32
    weights, AdamW's second moments on an 8-bit log scale (they set each weight's step size, and span dozens of
    binades: a per-tensor grid of 255 log steps keeps each step size within 2^(span / 1016) - 1, 2.3 % at the 34
    binades a trunk here spans, where fp8 would flush the smallest to zero and blow their steps up), step counts,
    schedule, position and RNG. Left out: the first moments (a running mean of the last ~10 gradients at beta1
    0.9; restarted at zero they only shrink the first few updates after a resume) and the EMA (it restarts from the
    weights; cooldown branches average their own decay anyway)."""
    optimizer = state["optimizer"]
    moments = {i: {"step": s["step"], **_to_log8(s["exp_avg_sq"])} for i, s in optimizer["state"].items()}
    return {**{k: v for k, v in state.items() if k not in ("ema", "optimizer")}, "compact": True,
            "optimizer": {"state": moments, "param_groups": optimizer["param_groups"]}}


def expand_compact_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The full training state a compact one stands for: fp32 second moments, first moments at zero, the EMA
    restarted from the weights (its warm-up ramp included)."""
    optimizer = state["optimizer"]
    moments = {}
    for i, s in optimizer["state"].items():
        exp_avg_sq = _from_log8(s)
        moments[i] = {"step": s["step"], "exp_avg": torch.zeros_like(exp_avg_sq), "exp_avg_sq": exp_avg_sq}
    return {**{k: v for k, v in state.items() if k != "compact"}, "ema": {"module": state["model"], "num_updates": 0},
            "optimizer": {"state": moments, "param_groups": optimizer["param_groups"]}}


def _to_log8(t: torch.Tensor) -> dict[str, Any]:
    """A non-negative tensor as uint8 codes: 0 for an exact zero, else 1..255 on an even grid of log2 between its
    smallest and largest positive values (the grid's origin and spacing are kept beside the codes)."""
    positive = t > 0
    codes = torch.zeros(t.shape, dtype=torch.uint8)
    if not positive.any():
        return {"exp_avg_sq_log8": codes, "log2_origin": 0.0, "log2_spacing": 0.0}
    log2 = torch.log2(t[positive].float())
    origin = log2.min().item()
    spacing = max(log2.max().item() - origin, 1e-6) / 254
    codes[positive.cpu()] = (1 + torch.round((log2 - origin) / spacing)).clamp(1, 255).to(torch.uint8).cpu()
    return {"exp_avg_sq_log8": codes, "log2_origin": origin, "log2_spacing": spacing}


def _from_log8(s: Mapping[str, Any]) -> torch.Tensor:
    codes = s["exp_avg_sq_log8"]
    values = torch.exp2(s["log2_origin"] + (codes.float() - 1) * s["log2_spacing"])
    return torch.where(codes > 0, values, torch.zeros_like(values))


@dataclass
class Progress:
    """Where the run stands: completed epochs and optimizer steps, and the running loss of the current epoch."""
    epoch: int
    step: int = 0
    step_in_epoch: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0


class TransformerTrainer:
    """MVTM training of `maskgit.transformer` on `data` with the flags of training_transformer.py (`args`).

    Writes into `out`: transformer_{last,epoch_N}.pt (EMA weights, the lab's plain state_dicts),
    transformer_raw_last.pt (raw weights) and training_state.pt (see save_state). `adamw` picks one of the
    AdamW implementations (benchmarks/train_throughput.py --variants; None: configure_optimizers' choice). On the
    CPU it sets the process's malloc to keep freed memory (keep_freed_memory): a step's large tensors then come back
    without page faults.
    """

    def __init__(self, maskgit: MaskGit, data: TokenData, args: argparse.Namespace, config: dict[str, Any],
                 env: DistEnv, out: Path, lr_factor: Callable[[int], float] | None = None,
                 cooldown_start: int | None = None, adamw: str | None = None) -> None:
        self.maskgit, self.data, self.args, self.config, self.env = maskgit, data, args, config, env
        if env.device.type == "cpu":
            keep_freed_memory()
        self.model = maskgit.transformer
        self.state_path = out / "training_state.pt"
        self.out = out
        self.sampler = DistributedSampler(range(len(data.train)), num_replicas=env.world_size, rank=env.rank,
                                          shuffle=True, seed=args.seed)
        self.steps_per_epoch = len(self.sampler) // (args.batch_size * args.accum_grad)
        if self.steps_per_epoch == 0:
            raise UserError(f"{len(data.train)} training sequences (with flips) are fewer than one optimizer step "
                            f"needs (--batch-size x --accum-grad x processes); lower them or raise --partial")
        self.total_steps = (args.epochs - args.start_from_epoch) * self.steps_per_epoch
        self.optimizer = self.model.configure_optimizers(args.learning_rate, tuple(args.betas), args.weight_decay,
                                                         implementation=adamw)
        # a cooldown branch (--cooldown-steps) decays from the trunk's step cooldown_start and stops at rate 0
        self.cooldown_start = cooldown_start
        if lr_factor is None:  # lr_factor(step) scales the peak rate
            lr_factor = warmup_cosine(args.warmup_steps, self.total_steps) if args.schedule == "cosine" else \
                warmup_stable_decay(args.warmup_steps, cooldown_start, args.cooldown_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        cuda = env.device.type == "cuda"
        self.ddp_model = DistributedDataParallel(self.model, device_ids=[env.device] if cuda else None) \
            if env.distributed else self.model
        self.forward_model = torch.compile(self.ddp_model) if args.compile else self.ddp_model  # saved: self.model
        self.ema = EMA(self.model, args.ema_decay)
        self.progress = Progress(args.start_from_epoch)
        self.masks = TrainingMasks(maskgit, args.train_masks, args.hole_mask_prob, args.seed, env.device)
        if trains_on_images(self.model, args.augment) and data.train_images is None:
            raise UserError("pixel conditioning and --augment shift train on images: load the data with them "
                            "(TokenData.from_cache(..., images=...))")
        if args.augment == "shift" and data.shifted is None:
            raise UserError("--augment shift trains on cached jittered grids: load the data with them "
                            "(TokenData.from_cache(..., shifted_path=...))")

    @property
    def last_step(self) -> int | None:
        """The step this process stops after: --max-steps, or a cooldown branch's end (None: no such limit)."""
        ends = [self.cooldown_start + self.args.cooldown_steps] if self.cooldown_start is not None else []
        return min(ends + ([self.args.max_steps] if self.args.max_steps else []), default=None)

    def summary(self) -> str:
        a, env = self.args, self.env
        if self.cooldown_start is not None:
            schedule = f"cooldown steps {self.cooldown_start + 1}-{self.cooldown_start + a.cooldown_steps} (1 - sqrt)"
        elif a.schedule == "wsd":
            schedule = "wsd trunk (constant rate after warm-up, until --max-steps / --max-minutes / Ctrl-C)"
        else:
            schedule = f"cosine, {self.total_steps} total"
        return (f"transformer {sum(p.numel() for p in self.model.parameters()) / 1e6:.1f}M params | "
                f"{len(self.data.train)} train sequences (with flips), {len(self.data.val_target)} val | "
                f"{env.world_size} process(es) x batch {a.batch_size} x accum {a.accum_grad} | "
                f"{self.steps_per_epoch} steps/epoch, {schedule} | train masks {a.train_masks}"
                f"{f' (hole mask prob {a.hole_mask_prob})' if a.train_masks == 'mix' else ''} | augment {a.augment}"
                f"{' | pixel conditioning' if self.model.pixel_conditioning else ''} | device {env.device}, "
                f"{'bf16' if a.amp == 'bf16' else 'fp32'}")

    def load_state(self, state: dict[str, Any], source: Path) -> None:
        """Continue exactly where save_state left off (this rank's RNG included); a compact state continues with the
        moments and EMA it rebuilds (compact_state). A new cooldown branch restarts the EMA from the trunk's
        weights, so that it averages the decay only."""
        if state.get("compact"):
            state = expand_compact_state(state)
        if self.cooldown_start is not None and "cooldown_start" not in state:
            state = {**state, "ema": {"module": state["model"], "num_updates": 0}}
        if self.model.pixel_conditioning and "pixel_emb.weight" not in state["model"]:
            state = self.with_pixel_conditioning(state)
        load_state_dict_strict(self.model, state["model"], source=str(source))
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # the next step's rate from this run's schedule (a cooldown's differs from the trunk's it branches from)
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.progress = Progress(state["epoch"], state["step"], state["step_in_epoch"], state["loss_sum"],
                                 state["loss_count"])
        set_rng_state(state["rng"][self.env.rank])

    def with_pixel_conditioning(self, state: dict[str, Any]) -> dict[str, Any]:
        """A state saved without pixel conditioning (e.g. the long run's trunk), continued with it: the weights
        and the EMA get the zero pixel_emb (the same function), and the optimizer keeps every saved moment; the
        pixel_emb parameters, which configure_optimizers appends to the end of each group (registered last), start
        without AdamW state, as in a new run."""
        saved = state["optimizer"]
        pairs = list(zip(self.optimizer.state_dict()["param_groups"], saved["param_groups"]))
        moments = {new: saved["state"][old] for group, saved_group in pairs
                   for old, new in zip(saved_group["params"], group["params"]) if old in saved["state"]}
        groups = [{**saved_group, "params": group["params"]} for group, saved_group in pairs]
        ema = {**state["ema"], "module": self.model.with_pixel_conditioning(state["ema"]["module"])}
        return {**state, "model": self.model.with_pixel_conditioning(state["model"]), "ema": ema,
                "optimizer": {"state": moments, "param_groups": groups}}

    def save_state(self) -> None:
        """training_state.pt: everything --resume needs, every rank's RNG included (a collective call)."""
        check_finite_weights(self.model, self.progress.step, self.state_path)
        rngs = all_gather_object(rng_state(), self.env)
        if self.env.is_main:
            p = self.progress
            state = {"format": TRAINING_STATE_TAG, "model": weights(self.model), "ema": self.ema.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "epoch": p.epoch, "step": p.step, "step_in_epoch": p.step_in_epoch, "loss_sum": p.loss_sum,
                     "loss_count": p.loss_count, "rng": rngs, "world_size": self.env.world_size,
                     "args": vars(self.args), "config": self.config}
            if self.cooldown_start is not None:
                state["cooldown_start"] = self.cooldown_start
            atomic_save(state, self.state_path)
            if self.args.schedule == "wsd" and self.cooldown_start is None:
                atomic_save(compact_state(state), self.out / COMPACT_STATE_NAME)

    def save_weights(self, tag: str, raw: bool) -> None:
        """transformer_{tag}.pt (EMA weights) and, with `raw`, transformer_raw_{tag}.pt; never NaN weights."""
        check_finite_weights(self.model, self.progress.step, self.state_path)
        if self.env.is_main:
            atomic_save(weights(self.ema.module), self.out / f"transformer_{tag}.pt")
            if raw:
                atomic_save(weights(self.model), self.out / f"transformer_raw_{tag}.pt")

    @torch.no_grad()
    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The target tokens [B, N] of these training sequences and, when the step needs them, their normalized
        images [B, 3, H, W]; with --augment shift both are those of one cached jitter of each (training.augment)."""
        data = self.data
        if data.train_images is None:
            return data.train[rows].long(), None
        n = len(data.train_images)
        images = normalized(data.train_images[rows % n], "train")
        images = torch.where((rows >= n)[:, None, None, None], images.flip(-1), images)
        if self.args.augment != "shift":
            return data.train[rows].long(), images
        variant = torch.randint(len(data.shifted), (len(rows),), device=rows.device)
        return data.shifted[variant, rows].long(), jitter(images, data.shift_jitters[variant, rows])

    def optimizer_step(self, order: torch.Tensor, interrupt: GracefulInterrupt) -> tuple[float, bool]:
        """One optimizer step over --accum-grad micro-batches of the epoch order -> (loss averaged over ranks,
        whether any rank was interrupted); a non-finite loss stops the run before the weights change."""
        a, env = self.args, self.env
        step_loss = torch.zeros((), device=env.device)
        for micro in range(a.accum_grad):
            first = (self.progress.step_in_epoch * a.accum_grad + micro) * a.batch_size
            target, images = self.batch(order[first:first + a.batch_size])
            corrupted, mask, pixel_known = self.masks(target)
            pixels = (images, pixel_known) if self.model.pixel_conditioning else None
            last_micro = micro == a.accum_grad - 1
            with nullcontext() if last_micro or not env.distributed else self.ddp_model.no_sync():
                with autocast(env.device, a.amp):
                    logits = self.forward_model(corrupted, mask, pixels)  # the masked positions only
                loss = self.maskgit.loss(logits, target, mask, a.label_smoothing) / a.accum_grad
                loss.backward()
            step_loss += loss.detach()
        # one collective per step: the mean loss and whether any rank was interrupted
        total, interrupted = all_reduce_sum([step_loss.item(), float(interrupt.requested)], env)
        mean_loss = total / env.world_size
        if not math.isfinite(mean_loss):
            raise diverged(f"the training loss is {mean_loss}", self.progress.step + 1, self.state_path)
        if a.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), a.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        p = self.progress
        p.step += 1
        p.step_in_epoch += 1
        p.loss_sum += mean_loss
        p.loss_count += 1
        return mean_loss, bool(interrupted)

    def stop_reason(self, interrupted: bool) -> str | None:
        """Why the run stops after the step just taken, if it does: interrupted, cooldown (the branch's last
        step), max-steps or max-minutes."""
        a, step = self.args, self.progress.step
        if interrupted:
            return "interrupted"
        if self.cooldown_start is not None and step == self.cooldown_start + a.cooldown_steps:
            return "cooldown"
        if step == self.last_step:
            return "max-steps"
        if a.max_minutes and time.time() - self.started >= 60 * a.max_minutes:
            return "max-minutes"
        return None

    def stop_early(self, reason: str, log: CSVLog, started: float, say: Callable[[str], None]) -> None:
        """Save a state and the weights; an interrupt then ends the process (exit 130), the other stops validate
        and log a row of their kind first."""
        if reason != "interrupted":
            say(self.log_validation(log, started, "cooldown" if reason == "cooldown" else "stop",
                                    self.progress.epoch))
        self.save_state()
        self.save_weights("last", raw=True)
        if reason == "interrupted":
            raise TrainingStopped(f"interrupted at step {self.progress.step} (epoch {self.progress.epoch + 1}): "
                                  f"training state saved to {self.state_path}; continue with --resume",
                                  EXIT_INTERRUPTED)
        done = {"cooldown": f"cooldown done (learning rate 0 at step {self.progress.step})",
                "max-steps": f"reached --max-steps {self.args.max_steps}",
                "max-minutes": f"reached --max-minutes {self.args.max_minutes:g}"}[reason]
        say(f"{done}: state saved to {self.state_path}" + ("" if reason == "cooldown" else "; continue with --resume"))

    def epoch_order(self) -> torch.Tensor:
        """The order of the training sequences in the current epoch (this rank's share), in train mode."""
        self.sampler.set_epoch(self.progress.epoch)
        self.model.train()
        return torch.tensor(list(self.sampler), device=self.env.device)

    def steps_until(self, stop: Callable[[], bool], interrupt: GracefulInterrupt) -> Iterator[float]:
        """Optimizer steps epoch after epoch until stop() or an interrupt, with no validation, logging or saving
        between epochs: training on a wall-clock budget (the GPU campaign). Yields each step's loss."""
        order = self.epoch_order()
        while not stop():
            if self.progress.step_in_epoch == self.steps_per_epoch:
                self.progress = Progress(self.progress.epoch + 1, self.progress.step)
                order = self.epoch_order()
            loss, interrupted = self.optimizer_step(order, interrupt)
            yield loss
            if interrupted:
                return

    def train_one_epoch(self, interrupt: GracefulInterrupt, steps: StepLog | None) -> str | None:
        """The rest of the current epoch, from its saved position; returns why the run stopped early (stop_reason),
        or None at the epoch's end. Each step goes to `steps` with the learning rate it ran at."""
        a = self.args
        order = self.epoch_order()
        of_epochs = f"/{a.epochs}" if a.schedule == "cosine" else ""
        bar = tqdm(total=self.steps_per_epoch, initial=self.progress.step_in_epoch,
                   desc=f"epoch {self.progress.epoch + 1}{of_epochs}", disable=not self.env.is_main,
                   dynamic_ncols=True, leave=False)
        with bar:
            while self.progress.step_in_epoch < self.steps_per_epoch:
                lr, began = self.scheduler.get_last_lr()[0], time.perf_counter()
                loss, interrupted = self.optimizer_step(order, interrupt)
                if steps is not None:
                    steps.write(self.progress.step, loss, lr, time.perf_counter() - began)
                bar.update()
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                reason = self.stop_reason(interrupted)
                if reason:
                    return reason
                if a.ckpt_interval and self.progress.step % a.ckpt_interval == 0:
                    self.save_state()
        return None

    def log_validation(self, log: CSVLog, started: float, kind: str, epoch: int) -> str:
        """Validate the EMA weights on both kinds of val masks and log a row of `kind`; returns its summary."""
        a, p = self.args, self.progress
        val_loss, val_acc = validate(self.ema.module, self.data, a.batch_size, self.env, a.amp)
        hole_loss, hole_acc = validate(self.ema.module, self.data, a.batch_size, self.env, a.amp, holes=True)
        train_loss = p.loss_sum / max(1, p.loss_count)
        if self.env.is_main:
            log.write({"epoch": epoch, "step": p.step, "train_loss": train_loss, "val_loss": val_loss,
                       "val_acc": val_acc, "lr": self.scheduler.get_last_lr()[0], "seconds": time.time() - started,
                       "val_hole_loss": hole_loss, "val_hole_acc": hole_acc, "kind": kind})
        label = f"epoch {epoch}" if kind == "epoch" else f"{kind} at step {p.step}"
        return (f"{label}: train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  val_acc {val_acc:.4f}  "
                f"val_hole_loss {hole_loss:.4f}  val_hole_acc {hole_acc:.4f}  ({time.time() - started:.0f} s)")

    def end_epoch(self, log: CSVLog, started: float) -> str:
        """Validate, log and save the EMA weights at the end of an epoch, then save a state; returns the summary."""
        summary = self.log_validation(log, started, "epoch", self.progress.epoch + 1)
        self.progress = Progress(self.progress.epoch + 1, self.progress.step)
        self.save_weights("last", raw=True)
        if self.progress.epoch % self.args.save_per_epoch == 0:
            self.save_weights(f"epoch_{self.progress.epoch}", raw=False)
        self.save_state()
        return summary

    def fit(self, log: CSVLog, say: Callable[[str], None]) -> tuple[BidirectionalTransformer, BidirectionalTransformer]:
        """Epochs until --epochs (or --max-steps, --max-minutes, a cooldown's end, or Ctrl-C: state saved); returns
        the raw and the EMA transformer. train_steps.csv gets every step; sittings.csv where each process began."""
        self.started = time.time()
        steps = None
        if self.env.is_main:
            steps = StepLog(self.out / "train_steps.csv", keep_until_step=self.progress.step)
            record_sitting(self.out / "sittings.csv", self.progress.step, self.env, self.args)
        try:
            with GracefulInterrupt(verbose=self.env.is_main) as interrupt:
                while self.progress.epoch < self.args.epochs:
                    started = time.time()
                    reason = self.train_one_epoch(interrupt, steps)
                    if reason:
                        self.stop_early(reason, log, started, say)
                        break
                    say(self.end_epoch(log, started))
        finally:
            if steps is not None:
                steps.close()
        return self.model, self.ema.module


# config and augment came later: a file that lacks them gets empty cells in its earlier rows
SITTING_FIELDS = ["started_utc", "first_step", "machine", "threads", "precision", "processes", "config", "augment"]


def record_sitting(path: Path, first_step: int, env: DistEnv, args: argparse.Namespace) -> None:
    """One row per process start: the machine a stretch of train_steps.csv ran on (sittings differ in CPU) and the
    recipe it trained (a long run's loss curve bends where its config or augmentation changed)."""
    lines = path.read_text().splitlines() if path.is_file() else [",".join(SITTING_FIELDS)]
    missing = len(SITTING_FIELDS) - len(lines[0].split(","))
    if missing:
        lines = [",".join(SITTING_FIELDS)] + [line + "," * missing for line in lines[1:]]
    machine = device_name(env.device).replace(",", " ")
    row = [time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), str(first_step), machine, str(torch.get_num_threads()),
           "bf16" if args.amp == "bf16" else "fp32", str(env.world_size), Path(args.MaskGitConfig).name, args.augment]
    atomic_write_text("\n".join(lines + [",".join(row)]) + "\n", path)
