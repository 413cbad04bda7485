"""What a GPU campaign brings back, written on the lent machine (training/campaign.py) and read here by the scorer
(training/campaign_report.py): results.json, the inpainted hole pixels of each hole set and the fp16 weight pair.

The device tool returns at most 8 files of 16 MiB from $OUT, so:
- results.json is rewritten atomically after every phase (Results): whatever the run reached comes back;
- the inpainted images come back as their hole pixels only (save_fill): the known pixels are the input's, pasted
  back exactly by the sampler, so the scorer rebuilds each image from the ground truth it holds;
- the weights come back as 16 MiB shards of fp16 tensors (utils.checkpoint.save_shards), when they fit beside the
  images.
Both sides draw the same holes (hole_set): the val holes are utils.masks.fixed_holes (the val study's strokes, and
boxes); the test holes are the prepared test set's (utils.cat_faces).
"""
from __future__ import annotations

import io
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch

from utils.cat_faces import CatFaces
from utils.checkpoint import atomic_write, load_shards
from utils.masks import fixed_holes

FORMAT = "maskgit-gpu-campaign/1"
RESULTS = "results.json"
WEIGHTS_PREFIX = "pair"  # pair-II-of-NN.pt, the shards of pair_state
# what the device tool returns from $OUT (its README): at most 8 files of 16 MiB, 64 MiB together
RETURN_FILES, RETURN_FILE_BYTES, RETURN_TOTAL_BYTES = 8, 16 * 2 ** 20, 64 * 2 ** 20
RESULTS_RESERVE = 256 * 1024  # room kept for results.json when deciding whether the weights fit
HOLE_SETS = ("val_stroke", "val_box", "test")  # the inpainted sets, each one file SET.npz

Product = TypeVar("Product")


class Results:
    """results.json in `out`: the run's header and one record per phase, rewritten atomically after every phase.
    Once `stop()` (an interrupt), the phases not yet started are recorded as skipped."""

    def __init__(self, out: Path, header: dict[str, Any], stop: Callable[[], bool] = lambda: False) -> None:
        self.out, self.path, self.stop = out, out / RESULTS, stop
        self.data: dict[str, Any] = {"format": FORMAT, **header, "phases": {}, "outputs": {}}
        self.save()

    def ok(self, name: str) -> bool:
        return self.data["phases"].get(name, {}).get("status") == "ok"

    def all_ok(self) -> bool:
        return all(record["status"] == "ok" for record in self.data["phases"].values())

    def run(self, name: str, phase: Callable[..., Product], *args: Any, needs: Sequence[str] = ()) -> Product | None:
        """Run one phase, phase(record, *args): it fills its record and returns what the later phases need (None
        here when it failed or was skipped). A failure is recorded (and printed) and the campaign goes on, since
        the run cannot be repeated; a phase whose `needs` did not succeed is skipped."""
        record: dict[str, Any] = {"status": "running"}
        self.data["phases"][name] = record
        missing = [n for n in needs if not self.ok(n)]
        if missing or self.stop():
            record.update(status="skipped", reason=f"needs {', '.join(missing)}" if missing else "interrupted")
            self.save()
            return None
        self.save()  # a run killed now still says which phase it was in
        print(f"--- {name}", flush=True)
        start = time.perf_counter()
        product = None
        try:
            product = phase(record, *args)
            record["status"] = "ok"
        except KeyboardInterrupt:
            record.update(status="interrupted")
            raise
        except Exception as e:  # noqa: BLE001 - recorded, and the phases that do not need this one still run
            traceback.print_exc()
            record.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
        finally:
            record["seconds"] = round(time.perf_counter() - start, 2)
            self.save()
            print(f"--- {name}: {record['status']} in {record['seconds']:.1f} s", flush=True)
        return product

    def save(self) -> None:
        self.data["outputs"] = {p.name: p.stat().st_size for p in sorted(self.out.iterdir())
                                if p.is_file() and p.name != RESULTS and not p.name.startswith(".")}
        text = json.dumps(self.data, indent=1, default=_json_default) + "\n"
        atomic_write(self.path, lambda f: f.write(text.encode()), durable=False)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def environment(device: torch.device) -> dict[str, Any]:
    """What ran the campaign: the versions and the chip, for the README table."""
    cuda = device.type == "cuda"
    return {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda,
            "device": str(device), "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "cpu": platform.processor() or platform.machine(), "argv": sys.argv}


def hole_set(data: CatFaces, name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(clean images, holes, normalization split) of one of HOLE_SETS: the val images with their fixed stroke or
    box holes, or the test images with the prepared test set's holes."""
    if name == "test":
        return data.test, data.test_holes, "test"
    return data.val, fixed_holes(name.removeprefix("val_"), len(data.val)), "val"


def save_fill(path: Path, images: np.ndarray, holes: np.ndarray) -> None:
    """SET.npz: the hole pixels of uint8 images [N,H,W,3] (row-major image order) and the holes bool [N,H,W]
    packed to bits; a third of the bytes of the images for strokes, and the known pixels are the input's anyway."""
    buf = io.BytesIO()
    np.savez_compressed(buf, fill=images[holes], holes=np.packbits(holes), shape=np.array(holes.shape))
    atomic_write(path, lambda f: f.write(buf.getvalue()), durable=False)


def fill_bytes_bound(holes: np.ndarray) -> int:
    """An upper bound of save_fill's file size for these holes (zlib never grows data by more than ~0.1%)."""
    return int(holes.sum()) * 3 * 1001 // 1000 + holes.size // 8 + 4096


def load_fill(path: Path, ground_truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(images, holes) of a save_fill file: the hole pixels put back into their ground truth (uint8 [>=N,H,W,3];
    the first N images are used)."""
    with np.load(path) as f:
        shape = tuple(int(s) for s in f["shape"])
        holes = np.unpackbits(f["holes"], count=math.prod(shape)).reshape(shape).astype(bool)
        fill = f["fill"]
    if len(ground_truth) < shape[0] or ground_truth.shape[1:3] != shape[1:]:
        raise ValueError(f"{path}: {shape[0]} images of {shape[1]}x{shape[2]}, but the ground truth has "
                         f"{len(ground_truth)} of {ground_truth.shape[1]}x{ground_truth.shape[2]}")
    if len(fill) != holes.sum():
        raise ValueError(f"{path}: {len(fill)} hole pixels for {holes.sum()} holes; the file is damaged")
    images = ground_truth[:shape[0]].copy()
    images[holes] = fill
    return images, holes


def pair_state(vqgan: dict[str, torch.Tensor], transformer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one state_dict that the weight shards hold: the VQGAN's tensors under "vqgan.", the transformer's under
    "transformer." (load_pair splits it again)."""
    return {f"{part}.{k}": v for part, weights in (("vqgan", vqgan), ("transformer", transformer))
            for k, v in weights.items()}


def load_pair(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The (VQGAN, transformer) state_dicts of a campaign's returned weight shards, joined."""
    state = load_shards(folder, WEIGHTS_PREFIX)
    parts: dict[str, dict[str, torch.Tensor]] = {"vqgan": {}, "transformer": {}}
    for key, value in state.items():
        part, _, name = key.partition(".")
        parts[part][name] = value
    return parts["vqgan"], parts["transformer"]
