"""Inpainting throughput: the batched decoder (sampler.maskgit_sampler) against the lab skeleton's way.

The lab way inpaints one image at a time in fp32 and VQGAN-decodes the image at every step (for its
visualisations); the batched decoder runs B images per transformer call under bf16 autocast and decodes once.
Both apply the same decoding rule, so with argmax in fp32 they give identical tokens (tests/test_sampler.py).
Weights are random (speed does not depend on them): a lab-size VQGAN saved to a temporary folder and the
transformer of --config. Masks come from --mask-dir when it exists, else from synthetic brush strokes.
The last line is the ratio of images/s:  speedup X.XX

    OMP_NUM_THREADS=2 python benchmarks/inpaint_throughput.py --images 32 --lab-images 4
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.VQGAN import VQGAN  # noqa: E402
from models.VQGAN_Transformer import MaskGit, load_maskgit_config, resolve_path  # noqa: E402
from sampler.latent_mask import latent_known_mask  # noqa: E402
from sampler.maskgit_sampler import gumbel_noise, inpaint  # noqa: E402
from sampler.schedules import gamma_func  # noqa: E402
from utils.image import read_rgb  # noqa: E402


@torch.inference_mode()
def lab_way_inpaint(model: MaskGit, image: torch.Tensor, pixel_known: torch.Tensor, total_iter: int = 8,
                    gamma_type: str = "cosine", sweet_spot: int | None = None, argmax: bool = False,
                    temperature: float = 1.0, choice_temperature: float = 4.5,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The lab skeleton's loop for ONE image [1, 3, H, W] in fp32: returns (tokens [1, N], decoded image per step).

    Same rule as sampler.maskgit_sampler.decode, written the lab's way: topk of the n least confident tokens,
    torch.multinomial for sampling, and a VQGAN decode after every step.
    """
    mask_bc = ~latent_known_mask(pixel_known, model.vqgan.latent_resolution)
    _, z_indices = model.encode_to_z(image)
    mask_num = int(mask_bc.sum())
    gamma = gamma_func(gamma_type)
    decoded = []
    for step in range(total_iter):
        if step == sweet_spot:
            break
        logits = model.transformer(torch.where(mask_bc, model.mask_token_id, z_indices))[..., :model.mask_token_id]
        logp = (logits / temperature).log_softmax(dim=-1)
        if argmax:
            idx = logp.argmax(dim=-1)
        else:
            idx = torch.multinomial(logp[0].exp(), 1, generator=generator).view(1, -1)
        z_indices = torch.where(mask_bc, idx, z_indices)
        confidence = logp.gather(-1, idx[..., None]).squeeze(-1)
        if choice_temperature > 0:
            confidence = confidence + choice_temperature * (1 - step / total_iter) * gumbel_noise(
                confidence.shape, generator, confidence.device)
        confidence[~mask_bc] = math.inf
        n = math.ceil(float(gamma((step + 1) / total_iter)) * mask_num)
        mask_bc = torch.zeros_like(mask_bc)
        mask_bc[0, torch.topk(confidence[0], n, largest=False).indices] = True
        decoded.append(model.decode_tokens(z_indices))
    return z_indices, decoded


def brush_masks(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Free-form random-walk strokes covering about a quarter of the image: bool [n, 1, size, size], True = known."""
    rng = np.random.default_rng(seed)
    known = np.ones((n, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        y, x = rng.uniform(0, size, 2)
        while (~known[i]).mean() < 0.25:
            y = np.clip(y + rng.normal(0, 4), 0, size - 1)
            x = np.clip(x + rng.normal(0, 4), 0, size - 1)
            known[i] &= (yy - y) ** 2 + (xx - x) ** 2 > 9
    return torch.from_numpy(known)[:, None]


def load_masks(mask_dir: Path, n: int) -> torch.Tensor:
    """The first n lab masks (255 = known), cycled when the folder holds fewer."""
    files = sorted(mask_dir.glob("*.png"))
    masks = torch.from_numpy(np.stack([read_rgb(f)[..., 0] > 127 for f in files[:n]]))[:, None]
    return masks.repeat(math.ceil(n / len(masks)), 1, 1, 1)[:n]


def build_model(config: str, tmp: Path, device: str) -> MaskGit:
    """MaskGit of `config` with a random VQGAN of its VQ config saved in `tmp` (no checkpoint needed)."""
    cfg = load_maskgit_config(config)
    vq_config = resolve_path(cfg["VQ_Configs"]["VQ_config_path"])
    torch.save(VQGAN(yaml.safe_load(vq_config.read_text())["model_param"]).state_dict(), tmp / "VQGAN.pt")
    cfg["VQ_Configs"] = {"VQ_config_path": str(vq_config), "VQ_CKPT_path": str(tmp / "VQGAN.pt")}
    return MaskGit(cfg).to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/MaskGit.yml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=64, help="images for the batched decoder")
    parser.add_argument("--lab-images", type=int, default=16, help="images for the lab way (slow)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--total-iter", type=int, default=8)
    parser.add_argument("--mask-dir", default="cat_face/mask64")
    args = parser.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args.config, Path(tmp), args.device)
    n = max(args.images, args.lab_images)
    mask_dir = Path(args.mask_dir)
    known = load_masks(mask_dir, n) if mask_dir.is_dir() else brush_masks(n)
    images = torch.randn(n, 3, 64, 64)
    print(f"device {args.device}, threads {torch.get_num_threads()}, masks from "
          f"{mask_dir if mask_dir.is_dir() else 'synthetic strokes'}, T={args.total_iter}")

    def ours(count: int) -> None:
        for i in range(0, count, args.batch_size):
            j = min(i + args.batch_size, count)
            inpaint(model, images[i:j].to(args.device), known[i:j].to(args.device), total_iter=args.total_iter)

    def lab(count: int) -> None:
        for i in range(count):
            lab_way_inpaint(model, images[i:i + 1].to(args.device), known[i:i + 1].to(args.device),
                            args.total_iter, model.gamma_type, choice_temperature=model.choice_temperature)

    rates = {}
    for name, fn, count, warm in (("batched", ours, args.images, 2), ("lab way", lab, args.lab_images, 1)):
        fn(warm)  # warm-up: allocator, oneDNN/cuDNN kernel selection
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(count)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        rates[name] = count / (time.perf_counter() - t0)
        print(f"{name}: {rates[name]:.3f} images/s ({count} images)")
    print(f"speedup {rates['batched'] / rates['lab way']:.2f}")


if __name__ == "__main__":
    main()
