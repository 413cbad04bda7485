"""The GPU campaign: from the cat-face archive alone, train a VQGAN and a transformer on a lent GPU within minutes,
inpaint the val holes (strokes and boxes) and the test set, and write what the scorer needs into one folder.

    timeout -k 30 570 python gpu_campaign.py --source carry/cat_faces_64x64.zip --out $OUT --compile   # lab sizes
    python gpu_campaign.py --size mid --source carry/cat_faces_64x64.zip --out $OUT --compile   # fp16 pair returned
    python gpu_campaign.py --smoke --source cats.zip --out runs/smoke    # all phases on a CPU, tiny, in seconds
    python score_campaign.py runs/gpu_lab                                # here: FID of the returned images

Phases (training/campaign.py): data, vqgan, tokenize, transformer, weights, inpaint_val_stroke, inpaint_val_box,
inpaint_test; each training and inpainting phase stops on its minute budget. Output in --out: results.json
(rewritten after every phase), val_stroke.npz, val_box.npz, test.npz (the inpainted hole pixels) and, when the
pair fits the device's return limits beside them, pair-II-of-NN.pt (fp16 weights in 16 MiB shards).
Exit codes: 0 every phase done, 1 a phase failed (results.json says which and why; the others still ran),
2 bad flags or input, 130 interrupted (SIGINT/SIGTERM: the current phase keeps what it has, the rest are skipped).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from training.campaign import Settings, run_campaign
from training.campaign_files import Results, environment
from utils.cat_faces import DEFAULT_SOURCE
from utils.cli import EXIT_INTERRUPTED, OneLineParser, TrainingStopped, UserError, check_device, run_cli
from utils.precision import AMP_CHOICES, resolve_amp
from utils.train_utils import GracefulInterrupt, seed_everything

# per mode: the defaults of the flags left unset. On a GPU the budgets (7.2 minutes), the data phase and the fixed
# work fit a 9-minute deadline inside the README's `timeout 570` of a 10-minute device call; --smoke runs
# everything on a CPU in well under a minute
DEFAULTS = {
    "gpu": dict(vqgan_minutes=2.75, transformer_minutes=3.25, inpaint_minutes=0.4, first_files=None, test_size=747,
                deadline_minutes=9.0),
    "smoke": dict(vqgan_minutes=0.25, transformer_minutes=0.1, inpaint_minutes=0.2, first_files=200, test_size=16,
                  deadline_minutes=None),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=os.environ.get("CAT_FACES_ZIP", str(DEFAULT_SOURCE)),
                   help="the cat-face archive (.zip or folder; env CAT_FACES_ZIP)")
    p.add_argument("--out", required=True, help="an empty (or new) folder for the returned files, e.g. $OUT")
    p.add_argument("--size", choices=["lab", "mid"], default="lab",
                   help="lab: configs/VQGAN.yml + MaskGit.yml; mid: the *_mid.yml pair, small enough to come back")
    p.add_argument("--smoke", action="store_true",
                   help="tiny models (whatever --size), tiny budgets, the first 200 images, on the CPU")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu (always cpu with --smoke)")
    p.add_argument("--amp", choices=AMP_CHOICES, default="auto", help="bf16 autocast; auto: where bf16 is fast")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer's training forward")
    p.add_argument("--vqgan-minutes", type=float, default=None, help="stage-1 training budget")
    p.add_argument("--gan-warmup", type=float, default=0.5, help="share of the stage-1 budget before the GAN loss")
    p.add_argument("--transformer-minutes", type=float, default=None, help="stage-2 training budget")
    p.add_argument("--inpaint-minutes", type=float, default=None, help="budget of each of the three hole sets")
    p.add_argument("--deadline-minutes", type=float, default=None,
                   help="every phase done by then (from the start): budgets are cut to fit (gpu default 9, smoke none)")
    p.add_argument("--total-iter", type=int, default=8, help="decoding steps T")
    p.add_argument("--first-files", type=int, default=None, help="use only the first N images of the source")
    p.add_argument("--test-size", type=int, default=None, help="test images (prepare_dataset.py's flag)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="prepare_dataset.py's flag")
    p.add_argument("--seed", type=int, default=0, help="the dataset split's and the training's seed")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    for key, value in DEFAULTS["smoke" if args.smoke else "gpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.vqgan_minutes, args.transformer_minutes, args.inpaint_minutes) < 0 or not 0 <= args.gan_warmup <= 1:
        p.error("the --*-minutes budgets must be >= 0 and --gan-warmup in [0, 1]")
    if args.total_iter < 1 or (args.first_files is not None and args.first_files < 1):
        p.error("--total-iter and --first-files must be >= 1")
    return args


def run(args: argparse.Namespace) -> None:
    device = check_device(args.device or ("cpu" if args.smoke else "cuda:0" if torch.cuda.is_available() else "cpu"))
    source, out = Path(args.source), Path(args.out)
    if not source.exists():
        raise UserError(f"--source {source}: not found; carry the cat-face archive (e.g. carry/cat_faces_64x64.zip)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: not an empty folder; choose a new one (results of another run are never mixed)")
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)
    torch.set_float32_matmul_precision("high")  # TF32 on CUDA for the fp32 parts (VQGAN tokenizing and decoding)
    deadline = None if args.deadline_minutes is None else time.time() + 60 * args.deadline_minutes
    with tempfile.TemporaryDirectory(prefix="campaign-") as work, GracefulInterrupt(verbose=False) as interrupt:
        s = Settings(size="smoke" if args.smoke else args.size, source=source, out=out, work=Path(work),
                     device=device, amp=resolve_amp(args.amp, device), compile=args.compile,
                     minutes={"vqgan": args.vqgan_minutes, "transformer": args.transformer_minutes,
                              "inpaint": args.inpaint_minutes},
                     gan_warmup=args.gan_warmup, total_iter=args.total_iter, seed=args.seed, test_size=args.test_size,
                     val_fraction=args.val_fraction, first_files=args.first_files, deadline=deadline)
        results = Results(out, {"size": s.size, "recipe": asdict(s.recipe), "budgets_minutes": s.minutes,
                                "gan_warmup": s.gan_warmup, "deadline_minutes": args.deadline_minutes,
                                "environment": environment(device)},
                          stop=lambda: interrupt.requested)
        ok = run_campaign(s, results, interrupt)
    if interrupt.requested:
        raise TrainingStopped(f"interrupted: {out / 'results.json'} holds the phases done", EXIT_INTERRUPTED)
    if not ok:
        failed = [n for n, r in results.data["phases"].items() if r["status"] != "ok"]
        raise TrainingStopped(f"error: phases not done: {', '.join(failed)}; see {out / 'results.json'}", 1)
    print(f"done: {out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
