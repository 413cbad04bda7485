"""Reconstruction quality of a VQGAN checkpoint on a folder of images: PSNR, codebook usage, perplexity, and
with --rfid the FID of the reconstructions against the images themselves (our FID tool, Inception pool3).

    python evaluate_vqgan.py --config pretrained/VQGAN_small/VQGAN.yml --ckpt pretrained/VQGAN_small/VQGAN.pt --rfid
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from models.VQGAN import load_vqgan
from training.vqgan import load_images, reconstruct, validate
from utils.cli import run_cli
from utils.fid import fid_from_arrays
from utils.image import denormalize, to_uint8
from utils.precision import AMP_CHOICES, conv_memory_format


def main(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    model = load_vqgan(args.config, args.ckpt, device).to(memory_format=conv_memory_format(device))
    images = load_images(args.images, args.split, device)
    metrics = validate(model, images, args.batch_size, args.amp)
    line = (f"{len(images)} images from {args.images}: PSNR {metrics['val_psnr']:.2f} dB, "
            f"codebook usage {metrics['codebook_usage']:.3f}, perplexity {metrics['perplexity']:.1f}")
    if args.rfid:
        rec = np.concatenate([to_uint8(r) for r, _ in reconstruct(model, images, args.batch_size, args.amp)])
        line += f", rFID {fid_from_arrays(rec, to_uint8(denormalize(images)), device=device, progress=False):.2f}"
    print(line)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="pretrained/VQGAN_small/VQGAN.yml")
    p.add_argument("--ckpt", default="pretrained/VQGAN_small/VQGAN.pt")
    p.add_argument("--images", default="./cat_face/val/", help="folder of 64x64 images")
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="normalization statistics")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--amp", choices=AMP_CHOICES, default="auto", help="bf16 autocast, none (fp32), or auto: bf16 where it is faster")
    p.add_argument("--rfid", action="store_true", help="also the FID of the reconstructions against the images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--debug", action="store_true")
    arguments = p.parse_args()
    raise SystemExit(run_cli(lambda: main(arguments), debug=arguments.debug))
