"""How much of each masked token is still known: the numbers behind pixel guidance (docs/RESULTS.md).

    python benchmarks/mask_stats.py --mask-path cat_face/mask64
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sampler.latent_mask import latent_known_mask  # noqa: E402
from utils.cli import OneLineParser, run_cli  # noqa: E402
from utils.data import read_known_masks  # noqa: E402


def report(mask_path: str, latent_resolution: int) -> None:
    known = torch.from_numpy(read_known_masks(mask_path))[:, None]
    masked_tokens = ~latent_known_mask(known, latent_resolution)
    known_fraction = F.avg_pool2d(known.float(), known.shape[-1] // latent_resolution).flatten(1)
    print(f"{len(known)} masks | hole pixels {100 * (~known).float().mean():.1f} % | masked tokens (the lab's rule) "
          f"{100 * masked_tokens.float().mean():.1f} % | known pixels of a masked token, mean "
          f"{100 * known_fraction[masked_tokens].mean():.1f} % | all-hole tokens "
          f"{100 * (known_fraction == 0).float().mean():.1f} %")


if __name__ == "__main__":
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--mask-path", default="./cat_face/mask64", help="masks, 255 = known")
    p.add_argument("--latent-resolution", type=int, default=16)
    args = p.parse_args()
    sys.exit(run_cli(lambda: report(args.mask_path, args.latent_resolution)))
