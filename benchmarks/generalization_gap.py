"""Is the transformer short of data or of capacity and compute? Its loss on train images against val images.

validate() of training/transformer.py (cross-entropy without label smoothing, and accuracy, over the masked
tokens) runs on the val tokens and on as many train images (a fixed random subset of their unflipped tokens),
each with the same fixed masks: the uniform MVTM masks and the whole-hole masks that log.csv's val_loss and
val_hole_loss use. A model that memorises its data shows a train loss well below val (more data would help); a
gap near zero means it underfits: a larger shape or more compute would move it first.

    python benchmarks/generalization_gap.py --MaskGitConfig configs/MaskGit_small_gan.yml \\
        --transformer pretrained/long_run/cooldown_3/transformer.pt --token-cache ~/runs/trunk/token_cache.pt
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.VQGAN_Transformer import MaskGit, load_maskgit_config  # noqa: E402
from training.token_cache import image_dataset, load_token_cache  # noqa: E402
from training.transformer import TokenData, validate  # noqa: E402
from utils.cli import OneLineParser, UserError, run_cli  # noqa: E402
from utils.precision import AMP_CHOICES, resolve_amp  # noqa: E402
from utils.train_utils import DistEnv, atomic_write_text  # noqa: E402


def train_subset(count: int, n: int, seed: int) -> torch.Tensor:
    """The indices of n of the `count` train images, the same ones for a given seed."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:n]


def report(args: argparse.Namespace) -> None:
    maskgit = MaskGit(load_maskgit_config(args.MaskGitConfig))
    maskgit.load_transformer_checkpoint(args.transformer)
    cache = load_token_cache(args.token_cache)
    n = len(cache.val)
    if len(cache.train) < n:
        raise UserError(f"--token-cache {args.token_cache}: {len(cache.train)} train images, fewer than its {n} val "
                        f"images; use a run's full cache")
    env = DistEnv(0, 1, torch.device("cpu"))
    amp = resolve_amp(args.amp, env.device)
    subset = train_subset(len(cache.train), n, args.seed)
    splits = {"val": cache.val, "train": cache.train[subset]}
    images = {"val": None, "train": None}
    if maskgit.transformer.pixel_conditioning:  # it reads the known pixels too: the images the cache was made of
        images = {"val": image_dataset(args.val_d_path, "val").images,
                  "train": image_dataset(args.train_d_path, "train").images[subset.numpy()]}
    print(f"{args.transformer}: {n} val images against {n} of the {len(cache.train)} train images "
          f"(seed {args.seed}), same fixed masks, {amp}")
    print(f"{'masks':<12} {'val loss':>9} {'train loss':>10} {'gap':>8} {'val acc':>8} {'train acc':>9}")
    data = {split: TokenData.for_validation(tokens, maskgit, env.device, holes=True, images=images[split])
            for split, tokens in splits.items()}
    results = {}
    for holes, name in ((False, "uniform"), (True, "whole holes")):
        (val_loss, val_acc), (train_loss, train_acc) = (
            validate(maskgit.transformer, data[split], args.batch_size, env, amp, holes=holes) for split in splits)
        print(f"{name:<12} {val_loss:>9.4f} {train_loss:>10.4f} {val_loss - train_loss:>8.4f} "
              f"{val_acc:>8.2%} {train_acc:>9.2%}")
        results[name] = {"val_loss": val_loss, "train_loss": train_loss, "gap": val_loss - train_loss,
                         "val_acc": val_acc, "train_acc": train_acc}
    if args.json:
        atomic_write_text(json.dumps(results, indent=1) + "\n", args.json)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--MaskGitConfig", default="configs/MaskGit_small_gan.yml")
    p.add_argument("--transformer", required=True, help="transformer weights (e.g. a cooldown's transformer.pt)")
    p.add_argument("--token-cache", required=True, help="a run's token_cache.pt (the tokens it trained on)")
    p.add_argument("--train_d_path", default="./cat_face/train/", help="the train images (pixel conditioning only)")
    p.add_argument("--val_d_path", default="./cat_face/val/", help="the val images (pixel conditioning only)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="which train images")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file (long_run.py reads it)")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return run_cli(lambda: report(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
