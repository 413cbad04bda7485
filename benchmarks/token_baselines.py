"""What a transformer must beat: masked-token accuracy of chance and of always predicting the most frequent code.

    python benchmarks/token_baselines.py --token-cache transformer_checkpoints/small/token_cache.pt
"""
from __future__ import annotations

import argparse

import torch

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--token-cache", default="transformer_checkpoints/small/token_cache.pt")
    p.add_argument("--num-codes", type=int, default=1024)
    args = p.parse_args()
    cache = torch.load(args.token_cache, map_location="cpu", weights_only=False)
    train = torch.cat([cache["train"], cache["train_flip"]]).long().flatten()
    val = cache["val"].long().flatten()
    counts = torch.bincount(train, minlength=args.num_codes)
    top = int(counts.argmax())
    print(f"codes used in train: {int((counts > 0).sum())}/{args.num_codes}")
    print(f"chance accuracy: {1 / args.num_codes:.4%}")
    print(f"most frequent code ({top}) accuracy on val tokens: {(val == top).float().mean().item():.4%}")
