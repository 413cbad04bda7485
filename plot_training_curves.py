"""Training curves as PNG from the trainers' log.csv files (stage 1: val PSNR; stage 2: losses and val accuracy).

    python plot_training_curves.py --vqgan-log pretrained/VQGAN_small/log.csv \
        --transformer-log pretrained/MaskGit_small/log.csv --output docs/training_curves.png
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from matplotlib.figure import Figure


def read_log(path: str | Path) -> dict[str, list[float]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"error: {path}: no rows; train for at least one epoch first")
    return {k: [float(r[k]) for r in rows] for k in rows[0] if k != "kind"}  # kind: epoch / stop / cooldown


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vqgan-log", default="pretrained/VQGAN_small/log.csv")
    p.add_argument("--transformer-log", default="pretrained/MaskGit_small/log.csv")
    p.add_argument("--output", default="docs/training_curves.png")
    args = p.parse_args()
    vq, tr = read_log(args.vqgan_log), read_log(args.transformer_log)
    fig = Figure(figsize=(12, 3.4), dpi=100)
    ax = fig.subplots(1, 3)
    ax[0].plot(vq["epoch"], vq["val_psnr"], "o-")
    ax[0].set(title="stage 1: VQGAN val PSNR", xlabel="epoch", ylabel="dB")
    ax[1].plot(tr["epoch"], tr["train_loss"], "o-", label="train (label smoothing 0.1)")
    ax[1].plot(tr["epoch"], tr["val_loss"], "o-", label="val")
    ax[1].set(title="stage 2: masked-token cross-entropy", xlabel="epoch")
    ax[1].legend()
    ax[2].plot(tr["epoch"], [100 * a for a in tr["val_acc"]], "o-")
    ax[2].set(title="stage 2: val masked-token accuracy", xlabel="epoch", ylabel="%")
    fig.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
