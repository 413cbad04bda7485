"""What a transformer must beat: masked-token accuracy of chance and of always predicting the most frequent code.

    python benchmarks/token_baselines.py --token-cache transformer_checkpoints/small/token_cache.pt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.token_cache import load_token_cache  # noqa: E402
from utils.cli import OneLineParser, run_cli  # noqa: E402


def report(token_cache: str, num_codes: int) -> None:
    cache = load_token_cache(token_cache)
    train = torch.cat([cache.train, cache.train_flip]).long().flatten()
    counts = torch.bincount(train, minlength=num_codes)
    top = int(counts.argmax())
    print(f"codes used in train: {int((counts > 0).sum())}/{num_codes}")
    print(f"chance accuracy: {1 / num_codes:.4%}")
    print(f"most frequent code ({top}) accuracy on val tokens: {(cache.val.long() == top).float().mean().item():.4%}")


if __name__ == "__main__":
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--token-cache", default="transformer_checkpoints/small/token_cache.pt")
    p.add_argument("--num-codes", type=int, default=1024)
    args = p.parse_args()
    sys.exit(run_cli(lambda: report(args.token_cache, args.num_codes)))
