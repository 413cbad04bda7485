"""Score a folder returned by gpu_campaign.py here: the FID of its inpainted val (strokes, boxes) and test images
against their ground truth, with our FID tool, and print the README's table rows (Markdown).

    python score_campaign.py /work/.device/.../gpu_lab                       # the archive: $CAT_FACES_ZIP or default
    python score_campaign.py runs/gpu_lab --shipped                          # and the shipped CPU pair, same holes
    python score_campaign.py runs/gpu_mid --unpack checkpoints/campaign_mid  # also join the returned weight shards

The ground truth is rebuilt from --source with the campaign's flags (utils/cat_faces.py), so no prepared dataset is
needed; a different archive is refused. --unpack writes VQGAN.pt, transformer.pt and a MaskGit.yml that
inpainting.py and experiments.py take as --MaskGitConfig.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from training.campaign_files import HOLE_SETS
from training.campaign_report import (TABLE_HEADER, campaign_dataset, campaign_row, fid_scores, load_results,
                                      phase_table, returned_sets, shipped_pair, shipped_row, unpack_pair)
from utils.cat_faces import DEFAULT_SOURCE
from utils.cli import OneLineParser, UserError, check_device, run_cli
from utils.precision import AMP_CHOICES, resolve_amp


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results_dir", help="the folder gpu_campaign.py wrote (results.json, *.npz, pair-*.pt)")
    p.add_argument("--source", default=os.environ.get("CAT_FACES_ZIP", str(DEFAULT_SOURCE)),
                   help="the cat-face archive the campaign was given (env CAT_FACES_ZIP)")
    p.add_argument("--shipped", action="store_true",
                   help="also inpaint the same holes with the shipped CPU pair and add its row (minutes on a CPU)")
    p.add_argument("--unpack", default=None, help="join the returned weight shards into this folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception (and shipped-pair) batch")
    p.add_argument("--amp", choices=AMP_CHOICES, default="auto", help="precision of the shipped pair's decoding")
    p.add_argument("--total-iter", type=int, default=8, help="decoding steps T of the shipped pair")
    p.add_argument("--dims", type=int, choices=[64, 192, 768, 2048], default=2048,
                   help="Inception features: 2048 is the standard FID; the others only for quick checks")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    device = check_device(args.device)
    folder, source = Path(args.results_dir), Path(args.source)
    results = load_results(folder)
    if not source.exists():
        raise UserError(f"--source {source}: not found; pass the cat-face archive the campaign used")
    data = campaign_dataset(results, source)
    sets = returned_sets(folder, results, data)
    rows = [campaign_row(results, fid_scores(sets, device, args.batch_size, args.dims))]
    if args.shipped:
        metrics, shipped = shipped_pair(data, device, args.batch_size, resolve_amp(args.amp, device), args.total_iter)
        counts = {n: (len(images), len(images)) for n, (images, _) in shipped.items()}
        rows.append(shipped_row(metrics, fid_scores(shipped, device, args.batch_size, args.dims), counts))
    if args.unpack:
        print(f"weights: {', '.join(str(p) for p in unpack_pair(folder, results, Path(args.unpack)))}")
    missing = [n for n in HOLE_SETS if n not in sets]
    note = f" (not returned: {', '.join(missing)})" if missing else ""
    print(f"FID with {args.dims}-d Inception features{note}\n\n{TABLE_HEADER}\n" + "\n".join(rows) + "\n\n"
          + phase_table(results))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
