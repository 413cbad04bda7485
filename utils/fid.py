"""The one bridge from the repository into the FID tool, faster-pytorch-fid/fid_core.py.

The tool stands alone (lab users copy its folder around: it imports nothing from here), and its folder name,
the lab's, has hyphens, so it cannot be imported as a package: this module puts the folder on sys.path once.

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
    check_device,
    compute_statistics,
    default_device,
    fid_between,
    fid_from_arrays,
    frechet_distance,
    frechet_distance_scipy,
    image_source,
    load_images,
    load_statistics,
    read_csv_images,
    read_image,
    torchscript_default,
)

__all__ = ["FIDError", "check_device", "compute_statistics", "default_device", "fid_between", "fid_from_arrays",
           "frechet_distance", "frechet_distance_scipy", "image_source", "load_images", "load_statistics",
           "read_csv_images", "read_image", "torchscript_default"]
