"""The FID tool for code elsewhere in the repo: faster-pytorch-fid/fid_core.py, whose folder name
(the lab's) has hyphens and so cannot be imported as a package.

    from utils.fid import fid_from_arrays
    fid = fid_from_arrays(pred_uint8, gt_uint8, device="cuda:0", batch_size=50)  # [N,64,64,3] each
"""
from __future__ import annotations

import sys
from pathlib import Path

_FID_DIR = Path(__file__).resolve().parents[1] / "faster-pytorch-fid"
if str(_FID_DIR) not in sys.path:
    sys.path.insert(0, str(_FID_DIR))

from fid_core import (  # noqa: E402
    FIDError,
    compute_statistics,
    default_device,
    fid_between,
    fid_from_arrays,
    frechet_distance,
    image_source,
    load_images,
    load_statistics,
    read_csv_images,
)

__all__ = ["FIDError", "compute_statistics", "default_device", "fid_between", "fid_from_arrays",
           "frechet_distance", "image_source", "load_images", "load_statistics", "read_csv_images"]
