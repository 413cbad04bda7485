"""Tokenize the training and validation images once with the frozen VQGAN and keep the tokens on disk.

Stage 2 only ever needs the VQGAN's token ids, and the VQGAN is frozen, so encoding every image at every epoch
would waste most of the training time. The cache holds the tokens of the train images, of their horizontal
flips (augmentation), and of the val images. It is keyed by a SHA-256 over the images (file names and decoded pixels)
and the VQGAN weights file (bytes), and is rebuilt only when one of them changes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.VQGAN import VQGAN
from utils.checkpoint import atomic_save
from utils.cli import UserError
from utils.data import ImageFolderDataset
from utils.precision import autocast, bf16_is_fast

CACHE_FORMAT = "maskgit-token-cache-v1"
BF16_MIN_AGREEMENT = 0.999  # bf16 encoding is used only if it gives the fp32 token on at least this fraction
AGREEMENT_IMAGES = 64  # of the first training images, on which the agreement is measured


@dataclass
class TokenCache:
    """Token ids [num_images, num_image_tokens] as int16 (int32 for codebooks over 32767 codes)."""
    train: torch.Tensor
    train_flip: torch.Tensor  # row i is the tokens of train image i flipped left-right
    val: torch.Tensor
    encoder_precision: str


def image_dataset(folder: str | Path, split: str) -> ImageFolderDataset:
    """The images of a folder, or a UserError naming the folder."""
    try:
        return ImageFolderDataset(folder, split=split)
    except (OSError, ValueError) as e:  # missing or empty folder: the dataset's message names it
        raise UserError(str(e)) from e


def cache_key(datasets: dict[str, ImageFolderDataset], vq_ckpt_path: str | Path, precision: str) -> str:
    """SHA-256 over the cache format, the requested precision, every image (file name and decoded pixels) and
    the VQGAN weights file."""
    h = hashlib.sha256(f"{CACHE_FORMAT}\n{precision}\n".encode())
    for split in sorted(datasets):
        ds = datasets[split]
        h.update(f"split {split} {len(ds)}\n".encode())
        h.update("\n".join(p.name for p in ds.paths).encode())
        h.update(ds.images.tobytes())
    with open(vq_ckpt_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _token_dtype(vqgan: VQGAN) -> torch.dtype:
    return torch.int16 if vqgan.num_codebook_vectors < 2 ** 15 else torch.int32


@torch.no_grad()
def encode_tokens(vqgan: VQGAN, x: torch.Tensor, amp: str) -> torch.Tensor:
    """Token ids [B, N] of normalized images x [B, 3, H, W], encoded under `amp` ("bf16" or "none")."""
    with autocast(x.device, amp):
        _, indices, _ = vqgan.encode(x)
    return indices.view(x.shape[0], -1)


def bf16_agreement(vqgan: VQGAN, x: torch.Tensor, batch_size: int) -> float:
    """Fraction of tokens of the images x that bf16-autocast encoding assigns the same code as fp32."""
    same = [(encode_tokens(vqgan, b, "bf16") == encode_tokens(vqgan, b, "none")).flatten() for b in x.split(batch_size)]
    return torch.cat(same).double().mean().item()


def _encode_dataset(vqgan: VQGAN, dataset: ImageFolderDataset, device: torch.device, amp: str, flip: bool,
                    batch_size: int, num_workers: int, desc: str, verbose: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    # a generator of its own: the loader's seed would otherwise be drawn from torch's RNG, and a run that builds
    # its cache would train on other random draws than one that finds it
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator())
    plain, flipped = [], []
    try:
        for x in tqdm(loader, desc=desc, unit="batch", disable=not verbose, dynamic_ncols=True):
            x = x.to(device, non_blocking=True)
            if flip:  # original and flipped images share one forward pass
                tokens = encode_tokens(vqgan, torch.cat([x, x.flip(-1)]), amp).cpu()
                plain.append(tokens[:len(x)])
                flipped.append(tokens[len(x):])
            else:
                plain.append(encode_tokens(vqgan, x, amp).cpu())
    except ValueError as e:  # an unreadable image; from a worker the message ends with the original one
        raise UserError(str(e).strip().splitlines()[-1].removeprefix("ValueError: ")) from e
    dtype = _token_dtype(vqgan)
    return torch.cat(plain).to(dtype), (torch.cat(flipped).to(dtype) if flip else None)


def cache_is_current(path: str | Path, key: str) -> bool:
    """Whether `path` holds a cache built with `key` (the key hashes the format and every input); an unreadable
    file is not, and is rebuilt."""
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # missing or unreadable
        return False
    return isinstance(cache, dict) and cache.get("key") == key


def ensure_token_cache(vqgan: VQGAN, vq_ckpt_path: str | Path, train_dir: str | Path, val_dir: str | Path,
                       cache_path: str | Path, device: torch.device, precision: str = "auto", batch_size: int = 64,
                       num_workers: int = 0, verbose: bool = True) -> bool:
    """(Re)build the cache file unless it exists with the same key; returns True when it was built.

    precision: 'fp32', 'bf16', or 'auto' = bf16 if the device runs it fast (utils.precision.bf16_is_fast) and it
    matches fp32 on >= 99.9% of the tokens of the first 64 training images (measured at every build, printed and
    stored in the cache), else fp32.
    """
    datasets = {"train": image_dataset(train_dir, "train"), "val": image_dataset(val_dir, "val")}
    key = cache_key(datasets, vq_ckpt_path, precision)
    if cache_is_current(cache_path, key):
        return False

    vqgan = vqgan.to(device).eval()
    agreement = None
    if precision == "fp32" or (precision == "auto" and not bf16_is_fast(device)):
        amp = "none"
    else:
        first = torch.stack([datasets["train"][i] for i in range(min(AGREEMENT_IMAGES, len(datasets["train"])))])
        agreement = bf16_agreement(vqgan, first.to(device), batch_size)
        amp = "bf16" if precision == "bf16" or agreement >= BF16_MIN_AGREEMENT else "none"
        if verbose:
            print(f"token cache: bf16 encoding matches fp32 on {100 * agreement:.3f}% of {first.shape[0]} images' "
                  f"tokens -> encoding in {'bf16' if amp == 'bf16' else 'fp32'}")
    args = dict(device=device, amp=amp, batch_size=batch_size, num_workers=num_workers, verbose=verbose)
    train, train_flip = _encode_dataset(vqgan, datasets["train"], flip=True, desc="tokenizing train (+flips)", **args)
    val, _ = _encode_dataset(vqgan, datasets["val"], flip=False, desc="tokenizing val", **args)
    atomic_save({"format": CACHE_FORMAT, "key": key, "train": train, "train_flip": train_flip, "val": val,
                 "encoder_precision": "bf16" if amp == "bf16" else "fp32", "bf16_agreement": agreement,
                 "train_files": [p.name for p in datasets["train"].paths],
                 "val_files": [p.name for p in datasets["val"].paths]}, cache_path)
    if verbose:
        print(f"token cache: {len(train)} train (+{len(train_flip)} flipped) and {len(val)} val images -> {cache_path}")
    return True


def load_token_cache(cache_path: str | Path) -> TokenCache:
    obj = torch.load(cache_path, map_location="cpu", weights_only=True)
    return TokenCache(obj["train"], obj["train_flip"], obj["val"], obj["encoder_precision"])
