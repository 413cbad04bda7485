"""MaskGIT inpainting of the lab's test set: fill the holes of every masked image, then score FID.

Outputs (under --output-dir, the lab's names):
  test_results/image_%03d.png   the inpainted images (the FID input), named by test-image index
  mask_scheduling/test_%d.png   the latent mask after every step side by side (white = known), first --visualize images
  imga/test_%d.png              the masked input, then the image decoded at every step, first --visualize images
When ground truth is found (--gt, or test_gt.csv / test_gt/ beside the masked-image folder) it prints `FID:  <value>`.

    python inpainting.py --load-transformer-ckpt-path transformer_checkpoints/transformer_last.pt --total-iter 8
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from models.VQGAN_Transformer import MaskGit, load_maskgit_config, resolve_path
from sampler.maskgit_sampler import InpaintOutput, inpaint, tokens_to_uint8
from sampler.schedules import GAMMAS
from utils.checkpoint import ensure_writable_dir
from utils.data import InpaintingTestSet, read_gt_csv
from utils.image import read_rgb, save_png
from utils.train_utils import close_progress_bars

DEFAULT_CKPT = "./transformer_checkpoints/transformer_last.pt"
TILE_PAD = 2  # gray border between the steps of a visualisation strip
RESULT_NAME = "image_{:03d}.png"  # test_results/ file of test image i, the lab's name


class OneLineParser(argparse.ArgumentParser):
    """Flag errors as one line (no usage dump), exit status 2 like argparse."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32, help="images decoded together")
    p.add_argument("--partial", type=float, default=1.0, help="fraction of the test set to inpaint (the first ones)")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers (the test set is already in memory)")
    p.add_argument("--MaskGitConfig", default="configs/MaskGit.yml")
    p.add_argument("--load-transformer-ckpt-path", default=None,
                   help=f"transformer weights (default: model_param.transformer_ckpt of the config, else {DEFAULT_CKPT})")
    p.add_argument("--test-maskedimage-path", default="./cat_face/masked_image")
    p.add_argument("--test-mask-path", default="./cat_face/mask64")
    p.add_argument("--sweet-spot", type=int, default=None, help="stop after this step (1..--total-iter; default: the last)")
    p.add_argument("--total-iter", type=int, default=8, help="decoding steps T")
    p.add_argument("--mask-func", choices=list(GAMMAS), default=None, help="mask schedule (default: the config's gamma_type)")
    p.add_argument("--output-dir", default=".", help="where test_results/, mask_scheduling/ and imga/ go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decoding", choices=["sample", "argmax"], default=None,
                   help="sample each token or take the most likely one (default: the config's `decoding`, else sample)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the token distribution")
    p.add_argument("--choice-temperature", type=float, default=None,
                   help="Gumbel noise scale of the confidence ranking (default: the config's, 4.5 in the lab)")
    p.add_argument("--pixel-guidance", type=float, default=None,
                   help="pull of the known pixels on partly known tokens (sampler docstring; 0: the lab's decoding; "
                        "default: the config's `pixel_guidance`, else 0)")
    p.add_argument("--seam-blend", action=argparse.BooleanOptionalAction, default=None,
                   help="blend the fill into its border (sampler docstring; default: the config's `seam_blend`, "
                        "else off)")
    p.add_argument("--no-paste-back", action="store_true", help="keep the raw VQGAN decode at known pixels too")
    p.add_argument("--fp32", action="store_true", help="run the transformer in fp32 (default: bf16 autocast)")
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
    if args.temperature <= 0 or (args.choice_temperature is not None and args.choice_temperature < 0):
        p.error("--temperature must be > 0 and --choice-temperature >= 0")
    if args.pixel_guidance is not None and args.pixel_guidance < 0:
        p.error(f"--pixel-guidance must be >= 0, got {args.pixel_guidance}")
    if args.seam_blend and args.no_paste_back:
        p.error("--seam-blend blends the fill into the pasted-back known pixels; drop --no-paste-back")
    return args


def decoding_defaults(cfg: dict, config_path: str) -> dict:
    """The config's decoding choices (`decoding`, `pixel_guidance`, `seam_blend`), checked; the lab's when absent."""
    decoding = cfg.get("decoding", "sample")
    if decoding not in ("sample", "argmax"):
        raise ValueError(f"{config_path}: model_param.decoding is {decoding!r}; use sample or argmax")
    guidance = cfg.get("pixel_guidance", 0.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance < 0:
        raise ValueError(f"{config_path}: model_param.pixel_guidance is {guidance!r}; use a number >= 0")
    blend = cfg.get("seam_blend", False)
    if not isinstance(blend, bool):
        raise ValueError(f"{config_path}: model_param.seam_blend is {blend!r}; use true or false")
    return {"decoding": decoding, "pixel_guidance": float(guidance), "seam_blend": blend}


def check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def find_gt(args: argparse.Namespace) -> Path | None:
    """--gt when given (it must exist), else test_gt.csv or test_gt/ beside the masked-image folder, else None."""
    if args.gt is not None:
        if not Path(args.gt).exists():
            raise ValueError(f"--gt {args.gt}: not found; pass test_gt.csv, a folder of images, or --no-fid")
        return Path(args.gt)
    parent = Path(args.test_maskedimage_path).parent
    return next((p for p in (parent / "test_gt.csv", parent / "test_gt") if p.exists()), None)


def load_gt(path: Path) -> np.ndarray:
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() == ".png")
        if not files:
            raise ValueError(f"{path}: no PNG images in the ground-truth folder")
        return np.stack([read_rgb(f) for f in files])
    return read_gt_csv(path)


def strip(tiles: np.ndarray) -> np.ndarray:
    """uint8 [S, H, W, 3] -> one row of tiles with gray borders."""
    padded = np.pad(tiles, ((0, 0), (TILE_PAD, TILE_PAD), (TILE_PAD, TILE_PAD), (0, 0)), constant_values=128)
    return np.concatenate(list(padded), axis=1)


def step_tiles(model: MaskGit, result: InpaintOutput, rows: list[int], known: torch.Tensor,
               paste_back: bool) -> tuple[np.ndarray, np.ndarray]:
    """For the batch rows `rows` of a keep_steps result: uint8 tiles [R, S, H, W, 3] of the latent mask after every
    step (white = known, upscaled to the image size) and of the image decoded at every step."""
    steps, size = len(result.decode.step_tokens), result.masked.shape[1]
    tokens = torch.stack(result.decode.step_tokens)[:, rows].flatten(0, 1)  # [S*R, N], step-major
    base = np.tile(result.masked[rows], (steps, 1, 1, 1)) if paste_back else None
    images = tokens_to_uint8(model, tokens, base, known[rows].repeat(steps, 1, 1, 1), result.split,
                             result.seam_blend)
    images = images.reshape(steps, len(rows), *images.shape[1:]).swapaxes(0, 1)
    res = model.vqgan.latent_resolution
    masks = ~torch.stack(result.decode.step_masks)[:, rows].view(steps, len(rows), res, res).cpu().numpy()
    masks = np.kron(masks.swapaxes(0, 1), np.ones((1, 1, size // res, size // res), dtype=bool))
    return np.repeat(masks[..., None] * np.uint8(255), 3, axis=-1), images


def save_visualisations(out_dir: Path, model: MaskGit, result: InpaintOutput, rows: list[int], names: list[int],
                        known: torch.Tensor, paste_back: bool) -> None:
    """For each batch row in `rows`: imga/test_i.png (masked input, then every step's image) and
    mask_scheduling/test_i.png (the latent mask after every step, white = known, upscaled to the image size)."""
    masks, images = step_tiles(model, result, rows, known, paste_back)
    for r, row in enumerate(rows):
        save_png(strip(masks[r]), out_dir / "mask_scheduling" / f"test_{names[r]}.png")
        save_png(strip(np.concatenate([result.masked[row][None], images[r]])), out_dir / "imga" / f"test_{names[r]}.png")


def run(args: argparse.Namespace) -> None:
    device = check_device(args.device)
    for flag, folder in (("--test-maskedimage-path", args.test_maskedimage_path), ("--test-mask-path", args.test_mask_path)):
        if not Path(folder).is_dir():
            raise ValueError(f"{flag} {folder}: folder not found; prepare the dataset or pass the right folder")
    cfg = load_maskgit_config(args.MaskGitConfig)
    ckpt = resolve_path(args.load_transformer_ckpt_path or cfg.get("transformer_ckpt") or DEFAULT_CKPT)
    defaults = decoding_defaults(cfg, args.MaskGitConfig)
    decoding = args.decoding or defaults["decoding"]
    guidance = defaults["pixel_guidance"] if args.pixel_guidance is None else args.pixel_guidance
    blend = defaults["seam_blend"] if args.seam_blend is None else args.seam_blend
    if blend and args.no_paste_back:
        raise ValueError(f"{args.MaskGitConfig}: model_param.seam_blend is on, which needs the pasted-back known "
                         "pixels; pass --no-seam-blend with --no-paste-back")
    with warnings.catch_warnings(record=True) as caught:  # one line each, not Python's two-line format
        warnings.simplefilter("always")
        dataset = InpaintingTestSet(args.test_maskedimage_path, args.test_mask_path, split="test")
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    n = math.ceil(args.partial * len(dataset))
    gt_path = None if args.no_fid else find_gt(args)
    gt = load_gt(gt_path) if gt_path is not None else None
    if gt is not None and len(gt) != len(dataset):
        raise ValueError(f"{gt_path}: {len(gt)} ground-truth images for {len(dataset)} test images; "
                         "pass the matching --gt or --no-fid")

    model = MaskGit(cfg).to(device).eval()
    model.load_transformer_checkpoint(ckpt)
    generator = torch.Generator(device).manual_seed(args.seed)
    out_dir = ensure_writable_dir(args.output_dir, "--output-dir")
    for name in ("test_results", "mask_scheduling", "imga"):
        (out_dir / name).mkdir(exist_ok=True)

    loader = DataLoader(Subset(dataset, range(n)), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers)
    predictions = []
    for images, known, index in tqdm(loader, desc="inpainting", unit="batch"):
        index = index.tolist()
        rows = [r for r, i in enumerate(index) if i < args.visualize]
        images, known = images.to(device), known.to(device)
        result = inpaint(model, images, known, paste_back=not args.no_paste_back, total_iter=args.total_iter,
                         gamma_type=args.mask_func, sweet_spot=args.sweet_spot, temperature=args.temperature,
                         choice_temperature=args.choice_temperature, argmax=decoding == "argmax", generator=generator,
                         bf16=not args.fp32, keep_steps=bool(rows), pixel_guidance=guidance, seam_blend=blend)
        for r, i in enumerate(index):
            save_png(result.images[r], out_dir / "test_results" / RESULT_NAME.format(i))
        if rows:
            save_visualisations(out_dir, model, result, rows, [index[r] for r in rows], known, not args.no_paste_back)
        predictions.append(result.images)
    print(f"wrote {n} images to {out_dir / 'test_results'}")
    written = {RESULT_NAME.format(i) for i in range(n)}
    older = sorted(p.name for p in (out_dir / "test_results").glob("*.png") if p.name not in written)
    if older:  # e.g. from an earlier run without --partial: an FID over the folder would count them
        print(f"warning: {out_dir / 'test_results'} also holds {len(older)} older images (first: {older[0]}); "
              "remove them before computing FID on that folder", file=sys.stderr)
    if gt is not None:
        from utils.fid import fid_from_arrays  # Inception is loaded only when there is something to score

        print("FID: ", fid_from_arrays(np.concatenate(predictions), gt[:n], device=device, batch_size=args.batch_size))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:  # config, checkpoint, data, output and FID errors all say what to do
        if args.debug:
            raise
        close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # every image written so far is complete (save_png is atomic)
        if args.debug:
            raise
        close_progress_bars()
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
