"""How much of each masked token is still known: the numbers behind pixel guidance (README "Results").

    python benchmarks/mask_stats.py --mask-path cat_face/mask64
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sampler.latent_mask import latent_known_mask  # noqa: E402
from utils.data import _png_files, _read_mask  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mask-path", default="./cat_face/mask64", help="masks, 255 = known")
    p.add_argument("--latent-resolution", type=int, default=16)
    args = p.parse_args()
    known = torch.from_numpy(np.stack([_read_mask(f) for f in _png_files(args.mask_path, "mask")]) >= 128)[:, None]
    masked_tokens = ~latent_known_mask(known, args.latent_resolution)
    known_fraction = F.avg_pool2d(known.float(), known.shape[-1] // args.latent_resolution).flatten(1)
    print(f"{len(known)} masks | hole pixels {100 * (~known).float().mean():.1f} % | masked tokens (the lab's rule) "
          f"{100 * masked_tokens.float().mean():.1f} % | known pixels of a masked token, mean "
          f"{100 * known_fraction[masked_tokens].mean():.1f} % | all-hole tokens "
          f"{100 * (known_fraction == 0).float().mean():.1f} %")


if __name__ == "__main__":
    main()
