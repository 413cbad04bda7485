"""MaskGIT inpainting of the lab's test set: fill the holes of every masked image, then score FID.

Outputs (under --output-dir, the lab's names):
  test_results/image_%03d.png   the inpainted images (the FID input), named by test-image index
  mask_scheduling/test_%d.png   the latent mask after every step side by side (white = known), first --visualize images
  imga/test_%d.png              the masked input, then the image decoded at every step, first --visualize images
When ground truth is found (--gt, or test_gt.csv / test_gt/ beside the masked-image folder) it prints `FID:  <value>`.

    python inpainting.py --mask-func cosine --total-iter 8      # the shipped models (configs/MaskGit_demo.yml)
    python inpainting.py --MaskGitConfig configs/MaskGit_small.yml \
        --load-transformer-ckpt-path transformer_checkpoints/transformer_last.pt     # your own stage 2
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from models.schedules import GAMMAS
from models.VQGAN_Transformer import (DECODINGS, DEFAULT_TRANSFORMER_CKPT, ORDERINGS, MaskGit, decoding_choices,
                                      load_maskgit_config, transformer_ckpt_path)
from sampler.maskgit_sampler import InpaintOutput, inpaint
from sampler.visualize import step_tiles, strip
from utils.checkpoint import ensure_writable_dir
from utils.cli import OneLineParser, check_device, run_cli
from utils.data import ground_truth_of, load_test_set
from utils.image import save_png
from utils.precision import resolve_amp

DEFAULT_CONFIG = "configs/MaskGit_demo.yml"  # the shipped models and the decoding chosen on val (README)
RESULT_NAME = "image_{:03d}.png"  # test_results/ file of test image i, the lab's name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32, help="images decoded together")
    p.add_argument("--partial", type=float, default=1.0, help="fraction of the test set to inpaint (the first ones)")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers (the test set is already in memory)")
    p.add_argument("--MaskGitConfig", default=DEFAULT_CONFIG,
                   help="MaskGit YAML config (configs/MaskGit.yml: the lab's structure, which needs the lab's VQGAN)")
    p.add_argument("--load-transformer-ckpt-path", default=None,
                   help="transformer weights (default: model_param.transformer_ckpt of the config, else "
                        f"{DEFAULT_TRANSFORMER_CKPT})")
    p.add_argument("--test-maskedimage-path", default="./cat_face/masked_image")
    p.add_argument("--test-mask-path", default="./cat_face/mask64")
    p.add_argument("--sweet-spot", type=int, default=None, help="stop after this step (1..--total-iter; default: the last)")
    p.add_argument("--total-iter", type=int, default=8, help="decoding steps T")
    p.add_argument("--mask-func", choices=list(GAMMAS), default=None, help="mask schedule (default: the config's gamma_type)")
    p.add_argument("--output-dir", default=".", help="where test_results/, mask_scheduling/ and imga/ go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decoding", choices=DECODINGS, default=None,
                   help="sample each token or take the most likely one (default: the config's `decoding`, else sample)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature of the token distribution (default: the config's `temperature`, else 1)")
    p.add_argument("--final-temperature", type=float, default=None,
                   help="anneal the temperature linearly to this at the last step (sampler docstring; default: the "
                        "config's `final_temperature`, else none: constant)")
    p.add_argument("--ordering", choices=ORDERINGS, default=None,
                   help="which masked tokens each step fixes: the most confident or the next in a Halton order of "
                        "the grid (sampler docstring; default: the config's `ordering`, else confidence)")
    p.add_argument("--choice-temperature", type=float, default=None,
                   help="Gumbel noise scale of the confidence ranking (default: the config's, 4.5 in the lab)")
    p.add_argument("--pixel-guidance", type=float, default=None,
                   help="pull of the known pixels on partly known tokens (sampler docstring; 0: the lab's decoding; "
                        "default: the config's `pixel_guidance`, else 0)")
    p.add_argument("--seam-blend", action=argparse.BooleanOptionalAction, default=None,
                   help="blend the fill into its border (sampler docstring; default: the config's `seam_blend`, "
                        "else off)")
    p.add_argument("--no-paste-back", action="store_true", help="keep the raw VQGAN decode at known pixels too")
    p.add_argument("--fp32", action="store_true",
                   help="run the transformer in fp32 (default: bf16 autocast where the device has fast bf16 kernels)")
    p.add_argument("--visualize", type=int, default=8, help="how many test images get mask_scheduling/ and imga/")
    p.add_argument("--gt", default=None, help="ground truth: test_gt.csv or a folder of images (default: auto-detect)")
    p.add_argument("--no-fid", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if args.total_iter < 1:
        p.error(f"--total-iter must be >= 1, got {args.total_iter}")
    if args.sweet_spot is None:
        args.sweet_spot = args.total_iter
    if not 1 <= args.sweet_spot <= args.total_iter:
        p.error(f"--sweet-spot must be between 1 and --total-iter ({args.total_iter}), got {args.sweet_spot}")
    if args.batch_size < 1 or args.num_workers < 0 or args.visualize < 0:
        p.error("--batch-size must be >= 1, --num_workers and --visualize >= 0")
    if not 0 < args.partial <= 1:
        p.error(f"--partial must be in (0, 1], got {args.partial}")
    if any(t is not None and not t > 0 for t in (args.temperature, args.final_temperature)) or (
            args.choice_temperature is not None and args.choice_temperature < 0):
        p.error("--temperature and --final-temperature must be > 0 and --choice-temperature >= 0")
    if args.pixel_guidance is not None and args.pixel_guidance < 0:
        p.error(f"--pixel-guidance must be >= 0, got {args.pixel_guidance}")
    if args.seam_blend and args.no_paste_back:
        p.error("--seam-blend blends the fill into the pasted-back known pixels; drop --no-paste-back")
    return args


def save_visualisations(out_dir: Path, model: MaskGit, result: InpaintOutput, rows: list[int], names: list[int],
                        known: torch.Tensor, paste_back: bool) -> None:
    """For each batch row in `rows`: imga/test_i.png (masked input, then every step's image) and
    mask_scheduling/test_i.png (the latent mask after every step, white = known, upscaled to the image size)."""
    masks, images = step_tiles(model, result, rows, known, paste_back)
    for r, row in enumerate(rows):
        save_png(strip(masks[r]), out_dir / "mask_scheduling" / f"test_{names[r]}.png")
        save_png(strip(np.concatenate([result.masked[row][None], images[r]])), out_dir / "imga" / f"test_{names[r]}.png")


def decoding_settings(args: argparse.Namespace, cfg: dict) -> dict:
    """The decoding of this run: each flag given, else the config's choice (decoding_choices)."""
    chosen = decoding_choices(cfg, args.MaskGitConfig)
    for key in chosen:
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    if chosen["seam_blend"] and args.no_paste_back:
        raise ValueError(f"{args.MaskGitConfig}: model_param.seam_blend is on, which needs the pasted-back known "
                         "pixels; pass --no-seam-blend with --no-paste-back")
    return chosen


def inpaint_test_set(args: argparse.Namespace, model: MaskGit, dataset: Dataset, out_dir: Path,
                     settings: dict, device: torch.device) -> np.ndarray:
    """Inpaint `dataset` batch by batch, writing test_results/ (and the step pictures of the first --visualize
    images) as it goes -> uint8 [N, H, W, 3]."""
    generator = torch.Generator(device).manual_seed(args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    predictions = []
    for images, known, index in tqdm(loader, desc="inpainting", unit="batch"):
        index = index.tolist()
        rows = [r for r, i in enumerate(index) if i < args.visualize]
        images, known = images.to(device), known.to(device)
        result = inpaint(model, images, known, paste_back=not args.no_paste_back, total_iter=args.total_iter,
                         gamma_type=args.mask_func, sweet_spot=args.sweet_spot, temperature=settings["temperature"],
                         final_temperature=settings["final_temperature"], choice_temperature=args.choice_temperature, argmax=settings["decoding"] == "argmax",
                         generator=generator, amp="none" if args.fp32 else resolve_amp("auto", device),
                         keep_steps=bool(rows), pixel_guidance=settings["pixel_guidance"],
                         seam_blend=settings["seam_blend"], ordering=settings["ordering"])
        for r, i in enumerate(index):
            save_png(result.images[r], out_dir / "test_results" / RESULT_NAME.format(i))
        if rows:
            save_visualisations(out_dir, model, result, rows, [index[r] for r in rows], known, not args.no_paste_back)
        predictions.append(result.images)
    return np.concatenate(predictions)


def warn_about_older_results(out_dir: Path, n: int) -> None:
    """Files of an earlier run (e.g. one without --partial) would be counted by an FID over the folder."""
    written = {RESULT_NAME.format(i) for i in range(n)}
    older = sorted(p.name for p in (out_dir / "test_results").glob("*.png") if p.name not in written)
    if older:
        print(f"warning: {out_dir / 'test_results'} also holds {len(older)} older images (first: {older[0]}); "
              "remove them before computing FID on that folder", file=sys.stderr)


def run(args: argparse.Namespace) -> None:
    device = check_device(args.device)
    cfg = load_maskgit_config(args.MaskGitConfig)
    settings = decoding_settings(args, cfg)
    dataset = load_test_set(args.test_maskedimage_path, args.test_mask_path)
    n = math.ceil(args.partial * len(dataset))
    gt = None if args.no_fid else ground_truth_of(dataset, args.gt, args.test_maskedimage_path)

    model = MaskGit(cfg).to(device).eval()
    model.load_transformer_checkpoint(transformer_ckpt_path(cfg, args.load_transformer_ckpt_path))
    out_dir = ensure_writable_dir(args.output_dir, "--output-dir")
    for name in ("test_results", "mask_scheduling", "imga"):
        (out_dir / name).mkdir(exist_ok=True)
    predictions = inpaint_test_set(args, model, Subset(dataset, range(n)), out_dir, settings, device)
    print(f"wrote {n} images to {out_dir / 'test_results'}")
    warn_about_older_results(out_dir, n)
    if gt is not None:
        from utils.fid import fid_from_arrays  # Inception is loaded only when there is something to score

        print("FID: ", fid_from_arrays(predictions, gt[:n], device=device, batch_size=args.batch_size))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args), debug=args.debug)  # on Ctrl-C every image written is complete (atomic)


if __name__ == "__main__":
    sys.exit(main())
