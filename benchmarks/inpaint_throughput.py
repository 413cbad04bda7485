"""Inpainting throughput: the batched decoder (sampler.maskgit_sampler) against the lab skeleton's way.

The lab way inpaints one image at a time in fp32 and VQGAN-decodes the image at every step (for its
visualisations); the batched decoder runs B images per transformer call, under bf16 autocast where the device has
fast bf16 kernels (as inpainting.py does; --amp), and decodes once.
Both apply the same decoding rule (sampler/lab_loop.py), so with argmax in fp32 they give identical tokens
(tests/test_sampler.py). Weights are random (speed does not depend on them): a lab-size VQGAN saved to a temporary
folder and the transformer of --config. Masks come from --mask-dir when it exists, else from the project's stroke
masks (utils/masks.py). Before the ratio it prints where the time goes, per image: one transformer forward in
fp32 at batch 1 and batched (in the batched decoder's precision), and one VQGAN decode at batch 1 and batched.
The ratio is about
    (T * fwd_batch1_fp32 + T * decode_batch1) / (T * fwd_batched + decode_batched)   (plus one encode each side)
so once the forwards are compute-bound, batching gains little and the ratio is the bf16 gain (none without fast
bf16 kernels) times what the T - 1 saved decodes add.
The last line is the ratio of images/s:  speedup X.XX

    OMP_NUM_THREADS=2 python benchmarks/inpaint_throughput.py --images 32 --lab-images 4
"""
from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.VQGAN import VQGAN  # noqa: E402
from models.VQGAN_Transformer import MaskGit, load_maskgit_config  # noqa: E402
from sampler.lab_loop import lab_way_inpaint  # noqa: E402
from sampler.maskgit_sampler import inpaint  # noqa: E402
from utils.cli import OneLineParser  # noqa: E402
from utils.config import resolve_path  # noqa: E402
from utils.data import read_known_masks  # noqa: E402
from utils.masks import stroke_mask  # noqa: E402
from utils.precision import AMP_CHOICES, autocast, resolve_amp  # noqa: E402


def test_masks(mask_dir: Path, n: int) -> torch.Tensor:
    """bool [n, 1, 64, 64], True = known: the first n masks of `mask_dir` (cycled when it holds fewer), else n
    stroke masks like the test set's."""
    if mask_dir.is_dir():
        known = read_known_masks(mask_dir)
        known = np.concatenate([known] * math.ceil(n / len(known)))[:n]
    else:
        rng = np.random.default_rng(0)
        known = ~np.stack([stroke_mask(rng) for _ in range(n)])
    return torch.from_numpy(known)[:, None]


def timed(fn: Callable[[], object], device: str) -> float:
    """Wall time of one fn() call, CUDA work included."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def seconds_per_call(fn: Callable[[], object], device: str, reps: int = 3) -> float:
    """Mean wall time of fn() after one warm-up call (allocator, oneDNN/cuDNN kernel selection)."""
    fn()
    return sum(timed(fn, device) for _ in range(reps)) / reps


def build_model(config: str, tmp: Path, device: str) -> MaskGit:
    """MaskGit of `config` with a random VQGAN of its VQ config saved in `tmp` (no checkpoint needed)."""
    cfg = load_maskgit_config(config)
    vq_config = resolve_path(cfg["VQ_Configs"]["VQ_config_path"])
    torch.save(VQGAN(yaml.safe_load(vq_config.read_text())["model_param"]).state_dict(), tmp / "VQGAN.pt")
    cfg["VQ_Configs"] = {"VQ_config_path": str(vq_config), "VQ_CKPT_path": str(tmp / "VQGAN.pt")}
    return MaskGit(cfg).to(device).eval()


def time_per_image(model: MaskGit, batch_size: int, device: str, amp: str) -> dict[str, float]:
    """Seconds per image of the pieces both ways are made of, on random tokens."""
    n = model.num_image_tokens
    one = torch.randint(0, model.mask_token_id, (1, n), device=device)
    batch = torch.randint(0, model.mask_token_id, (batch_size, n), device=device)
    with torch.inference_mode():
        fp32 = seconds_per_call(lambda: model.transformer(one), device)
        with autocast(device, amp):
            batched = seconds_per_call(lambda: model.transformer(batch), device) / batch_size
        decode_one = seconds_per_call(lambda: model.decode_tokens(one), device)
        decode_batch = seconds_per_call(lambda: model.decode_tokens(batch), device) / batch_size
    return {"forward fp32 batch 1": fp32, f"forward {'bf16' if amp == 'bf16' else 'fp32'} batch {batch_size}": batched,
            "decode batch 1": decode_one, f"decode batch {batch_size}": decode_batch}


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/MaskGit.yml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=64, help="images for the batched decoder")
    parser.add_argument("--lab-images", type=int, default=16, help="images for the lab way (slow)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--total-iter", type=int, default=8)
    parser.add_argument("--mask-dir", default="cat_face/mask64")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                        help="the batched decoder's precision (auto: bf16 where it is fast, as in inpainting.py)")
    args = parser.parse_args()
    amp = resolve_amp(args.amp, args.device)

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args.config, Path(tmp), args.device)
    n = max(args.images, args.lab_images)
    mask_dir = Path(args.mask_dir)
    known = test_masks(mask_dir, n)
    images = torch.randn(n, 3, 64, 64)
    print(f"device {args.device}, threads {torch.get_num_threads()}, masks from "
          f"{mask_dir if mask_dir.is_dir() else 'utils.masks.stroke_mask'}, T={args.total_iter}, batched decoder in "
          f"{'bf16' if amp == 'bf16' else 'fp32'}")

    def ours(count: int) -> None:
        for i in range(0, count, args.batch_size):
            j = min(i + args.batch_size, count)
            inpaint(model, images[i:j].to(args.device), known[i:j].to(args.device), total_iter=args.total_iter,
                    amp=amp)

    def lab(count: int) -> None:
        for i in range(count):
            lab_way_inpaint(model, images[i:i + 1].to(args.device), known[i:i + 1].to(args.device),
                            args.total_iter, model.gamma_type, choice_temperature=model.choice_temperature)

    rates = {}
    for name, fn, count, warm in (("batched", ours, args.images, 2), ("lab way", lab, args.lab_images, 1)):
        fn(warm)  # warm-up: allocator, oneDNN/cuDNN kernel selection
        rates[name] = count / timed(lambda: fn(count), args.device)
        print(f"{name}: {rates[name]:.3f} images/s ({count} images)")
    parts = time_per_image(model, args.batch_size, args.device, amp)
    print("seconds per image: " + ", ".join(f"{k} {v:.4f}" for k, v in parts.items()))
    f32, batched, dec1, dec_b = parts.values()
    t = args.total_iter
    print(f"batched forward vs batch-1 fp32 forward {f32 / batched:.2f}x; expected from the parts "
          f"(T forwards + decodes; encode and sampling left out) {(t * f32 + t * dec1) / (t * batched + dec_b):.2f}")
    print(f"speedup {rates['batched'] / rates['lab way']:.2f}")


if __name__ == "__main__":
    main()
