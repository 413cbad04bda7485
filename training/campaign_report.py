"""Scoring a folder that gpu_campaign.py returned, on this side: its inpainted images are rebuilt from the ground
truth, which the dataset split rebuilds here from the same source and flags (checked by the dataset identity in
results.json), their FID is measured with our FID tool (the Inception network cannot travel), and the README rows
are formatted. The shipped CPU pair can be measured the same way on the same holes, for the comparison.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from models.VQGAN_Transformer import MaskGit, load_maskgit_config, transformer_ckpt_path
from training.campaign import chosen_decoding, inpaint_images, tokenize_images
from training.campaign_files import FORMAT, HOLE_SETS, RESULTS, hole_set, load_fill, load_pair
from training.time_budget import Budget
from training.transformer import TokenData
from training.transformer import validate as token_validate
from training.vqgan import images_to_device
from training.vqgan import validate as vqgan_validate
from utils.cat_faces import CatFaces, dataset_identity, list_images, same_dataset, split_dataset
from utils.checkpoint import atomic_save, ensure_writable_dir
from utils.cli import UserError
from utils.config import load_config, resolve_path
from utils.train_utils import atomic_write_text
from utils.train_utils import DistEnv

SHIPPED_CONFIG = "configs/MaskGit_demo.yml"  # the shipped pair, with the decoding the campaign uses too
SET_TITLES = {"val_stroke": "FID val strokes", "val_box": "FID val boxes", "test": "FID test"}


def load_results(folder: Path) -> dict[str, Any]:
    path = folder / RESULTS
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read a campaign's results ({e}); pass the folder gpu_campaign.py wrote")
    if results.get("format") != FORMAT:
        raise UserError(f"{path}: not a results.json of gpu_campaign.py (format {results.get('format')!r})")
    return results


def campaign_dataset(results: dict[str, Any], source: Path) -> CatFaces:
    """The dataset the campaign used, rebuilt from `source` with its flags; refused when `source` differs."""
    data_phase = results["phases"].get("data", {})
    if data_phase.get("status") != "ok":
        raise UserError("the campaign's data phase did not finish; there is nothing to score")
    identity = data_phase["identity"]
    params = identity["params"]
    names = list_images(source)
    first = params.get("first_files")
    names = names[:first] if first else names
    here = dataset_identity(source, names, params["seed"], params["test_size"], params["val_fraction"], first)
    if not same_dataset(here, identity):
        raise UserError(f"--source {source}: not the archive the campaign used (sha256 {identity['source']['sha256']}"
                        f"); pass that one")
    return split_dataset(source, names, params["seed"], params["test_size"], params["val_fraction"])


def returned_sets(folder: Path, results: dict[str, Any], data: CatFaces) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(inpainted images, their ground truth) of every hole set the campaign returned; its holes must be the ones
    this side draws (the same seeds and test masks), else the FID would compare different tasks."""
    sets = {}
    for name in HOLE_SETS:
        if results["phases"].get(f"inpaint_{name}", {}).get("status") != "ok":
            continue
        gt, holes, _ = hole_set(data, name)
        images, returned_holes = load_fill(folder / f"{name}.npz", gt)
        if not np.array_equal(returned_holes, holes[:len(images)]):
            raise UserError(f"{folder / name}.npz: its holes are not the {name} holes drawn here; were they made by "
                            "another version of utils/masks.py or utils/cat_faces.py?")
        sets[name] = images, gt[:len(images)]
    return sets


def fid_scores(sets: dict[str, tuple[np.ndarray, np.ndarray]], device: torch.device, batch_size: int,
               dims: int) -> dict[str, float | None]:
    """FID of each set against its ground truth (None below 2 images); ground-truth features are cached on disk."""
    from utils.fid import compute_statistics, frechet_distance  # the Inception network only when scoring

    scores: dict[str, float | None] = {}
    for name, (images, gt) in sets.items():
        if len(images) < 2:
            scores[name] = None
            continue
        kw = dict(device=device, batch_size=batch_size, dims=dims, progress=False)
        scores[name] = frechet_distance(*compute_statistics(images, **kw),
                                        *compute_statistics(gt, cache=True, **kw), device=device)
    return scores


def shipped_pair(data: CatFaces, device: torch.device, batch_size: int, amp: str, total_iter: int
                 ) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The shipped CPU pair on the campaign's val and test: (its metrics as the campaign records them, its
    inpainted sets with their ground truth), with the campaign's decoding and no time limit."""
    cfg = load_maskgit_config(resolve_path(SHIPPED_CONFIG))
    maskgit = MaskGit(cfg).to(device).eval()
    maskgit.load_transformer_checkpoint(transformer_ckpt_path(cfg))
    metrics = vqgan_validate(maskgit.vqgan, images_to_device(data.val, "val", device), batch_size, amp)
    tokens = TokenData.for_validation(tokenize_images(maskgit, data.val, "val", batch_size), maskgit, device)
    metrics["val_token_accuracy"] = token_validate(maskgit.transformer, tokens, batch_size, DistEnv(0, 1, device),
                                                   amp)[1]
    metrics["params"] = {"vqgan": sum(p.numel() for p in maskgit.vqgan.parameters()),
                         "transformer": sum(p.numel() for p in maskgit.transformer.parameters())}
    decoding = chosen_decoding(resolve_path(SHIPPED_CONFIG), total_iter)
    sets = {}
    for name in HOLE_SETS:
        gt, holes, split = hole_set(data, name)
        sets[name] = inpaint_images(maskgit, gt, holes, split, decoding, batch_size, 0, amp, Budget(math.inf)), gt
    return metrics, sets


def unpack_pair(folder: Path, results: dict[str, Any], out: Path) -> list[Path]:
    """Join the returned weight shards into OUT/VQGAN.pt and OUT/transformer.pt and write OUT/VQGAN.yml and
    OUT/MaskGit.yml (the pair's configs, pointing at those files, with the campaign's decoding), checked by
    loading them: `inpainting.py --MaskGitConfig OUT/MaskGit.yml` then runs the returned pair."""
    if not results["phases"].get("weights", {}).get("returned"):
        raise UserError(f"{folder}: the campaign returned no weights (results.json: phases.weights)")
    vqgan, transformer = load_pair(folder)
    out = ensure_writable_dir(out, "--unpack")
    recipe = results["recipe"]
    atomic_save(vqgan, out / "VQGAN.pt")
    atomic_save(transformer, out / "transformer.pt")
    atomic_write_text(resolve_path(recipe["vqgan_config"]).read_text(), out / "VQGAN.yml")
    cfg = load_config(resolve_path(recipe["maskgit_config"]))
    decoding = results["decoding"]
    cfg["model_param"].update(
        VQ_Configs={"VQ_config_path": str(out / "VQGAN.yml"), "VQ_CKPT_path": str(out / "VQGAN.pt")},
        transformer_ckpt=str(out / "transformer.pt"),
        # a campaign run before the `ordering` or temperature keys has none: its pair decodes with their defaults, as
        # it did
        **{k: decoding[k] for k in ("gamma_type", "decoding", "pixel_guidance", "seam_blend", "ordering",
                                    "temperature", "final_temperature") if k in decoding})
    atomic_write_text(yaml.safe_dump(cfg, sort_keys=False), out / "MaskGit.yml")
    maskgit = MaskGit(load_maskgit_config(out / "MaskGit.yml"))  # refuses weights that do not fit the configs
    maskgit.load_transformer_checkpoint(out / "transformer.pt")
    return [out / name for name in ("VQGAN.pt", "VQGAN.yml", "transformer.pt", "MaskGit.yml")]


def _fid_cell(fid: float | None, n: int, of: int) -> str:
    if fid is None:
        return "-"
    return f"{fid:.2f}" if n == of else f"{fid:.2f} ({n} of {of})"


def _pair_row(name: str, machine: str, params: dict[str, int], training: str, metrics: dict[str, Any],
              fids: dict[str, float | None], counts: dict[str, tuple[int, int]]) -> str:
    cells = [name, machine, f"{params['vqgan'] / 1e6:.1f} M + {params['transformer'] / 1e6:.1f} M", training,
             f"{metrics['val_psnr']:.2f} dB", f"{100 * metrics['codebook_usage']:.1f} %",
             f"{100 * metrics['val_token_accuracy']:.2f} %",
             *(_fid_cell(fids.get(n), *counts.get(n, (0, 0))) for n in HOLE_SETS)]
    return "| " + " | ".join(cells) + " |"


TABLE_HEADER = ("| pair | trained on | parameters (VQGAN + transformer) | training (VQGAN + transformer) | val PSNR | "
                "codebook usage | val token accuracy | " + " | ".join(SET_TITLES[n] for n in HOLE_SETS) + " |\n"
                "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")


def campaign_row(results: dict[str, Any], fids: dict[str, float | None]) -> str:
    """The README row of a campaign (metrics that did not come back read '-')."""
    p = results["phases"]
    vq, tr = p.get("vqgan", {}), p.get("transformer", {})
    recipe = results["recipe"]
    metrics = {"val_psnr": vq.get("val_psnr", math.nan), "codebook_usage": vq.get("codebook_usage", math.nan),
               "val_token_accuracy": tr.get("val_token_accuracy", math.nan)}
    training = (f"{vq.get('train_seconds', 0) / 60:.1f} + {tr.get('train_seconds', 0) / 60:.1f} min "
                f"({vq.get('steps', 0)} + {tr.get('steps', 0)} steps)")
    counts = {n: (p[f"inpaint_{n}"]["images"], p[f"inpaint_{n}"]["of"]) for n in HOLE_SETS
              if p.get(f"inpaint_{n}", {}).get("status") == "ok"}
    env = results["environment"]
    name = f"{results['size']} ({Path(recipe['vqgan_config']).name} + {Path(recipe['maskgit_config']).name})"
    params = {"vqgan": vq.get("params", 0), "transformer": tr.get("params", 0)}
    return _pair_row(name, env["gpu"] or f"CPU ({env['cpu']})", params, training, metrics, fids, counts)


def shipped_row(metrics: dict[str, Any], fids: dict[str, float | None], counts: dict[str, tuple[int, int]]) -> str:
    return _pair_row("shipped CPU pair (pretrained/)", "CPU (docs/RESULTS.md)", metrics["params"], "see Results",
                     metrics, fids, counts)


def phase_table(results: dict[str, Any]) -> str:
    """Wall time, steps and images/s of every phase (the speed table of the campaign)."""
    lines = ["| phase | status | seconds | steps | images/s |", "| --- | --- | ---: | ---: | ---: |"]
    for name, r in results["phases"].items():
        speed = f"{r['images_per_s']:.1f}" if "images_per_s" in r else "-"
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', 0):.1f} | {r.get('steps', '-')} | {speed} |")
    return "\n".join(lines)
