"""The schedule study: inpainting FID for every mask schedule x T x sweet spot x decoding x ordering, with reference
rows.

Reference rows, measured on the same images: OpenCV Telea inpainting (radius 3), the oracle (the ground truth's
own VQGAN tokens decoded, known pixels pasted back: the ceiling of this VQGAN), the same with the seam blend, the
masked input as is (gray holes), the diffusion fill alone (utils.image.diffuse_fill, no learning) and "no
transformer": the VQGAN tokens of the diffusion-filled image, decoded and seam-blended (what pixel guidance would
give if the transformer had no say).
Outputs (under --output-dir):
  results.csv           one row per setting, appended as soon as it is measured (--resume skips rows already there)
  results.md            the same as a Markdown table: schedule, T, sweet spot, decoding, ordering, FID, seconds (of
                        inpainting)
  fid_vs_T.png          FID against T, one line per schedule, decoding and ordering (and sweet spot), references
                        dotted
  decoding_figure.png   the first --figure-images test images decoded with every schedule (T = the largest
                        --total-iters): the latent mask and the image after every step
  faces.png             the first --faces images side by side: masked input, the fill of the first setting, truth
Every setting re-seeds its generator with --seed, so a row does not depend on which rows ran before it.
--split val runs the study on the val images with stroke holes drawn from a fixed seed (utils.masks.fixed_holes), the same
kind of masks as the test set's: choose the decoding there and keep the test split for the final table.
--holes boxes replaces the strokes by one large axis-aligned box per image (16-36 px a side, from a fixed seed per
split; on test, the prepared set's ground truth with those boxes): the large-hole benchmark, where a whole eye or
nose can be missing and the transformer has to invent it.
Sweet spots: T (the full decode), a step s, or a fraction f of T written with a dot (step round(f*T), half up, >= 1).

    python experiments.py --split val --output-dir experiments_val       # the shipped models (MaskGit_demo.yml)
    python experiments.py --split val --holes boxes --output-dir experiments_val_boxes
    python experiments.py --only-references
    python experiments.py --MaskGitConfig configs/MaskGit_small.yml \
        --load-transformer-ckpt-path transformer_checkpoints/transformer_last.pt     # your own stage 2
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import math
import sys
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from matplotlib.figure import Figure
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from models.schedules import GAMMAS
from models.VQGAN_Transformer import (DECODINGS, DEFAULT_TRANSFORMER_CKPT, ORDERINGS, MaskGit, decoding_choices,
                                      load_maskgit_config, transformer_ckpt_path)
from sampler.maskgit_sampler import inpaint, tokens_to_uint8
from sampler.visualize import step_tiles, strip
from utils.checkpoint import ensure_writable_dir
from utils.cli import OneLineParser, check_device, run_cli
from utils.data import ImageFolderDataset, InpaintingTestSet, ground_truth_of, load_test_set
from utils.fid import compute_statistics, frechet_distance
from utils.image import diffuse_fill, to_uint8, uint8_to_tensor
from utils.masks import fixed_holes
from utils.precision import resolve_amp
from utils.train_utils import atomic_write_text

FIELDS = ["method", "schedule", "T", "sweet_spot", "sweet_spot_flag", "decoding", "ordering", "temperature",
          "choice_temperature", "pixel_guidance", "seam_blend", "fid", "seconds", "images", "seed", "split", "holes"]
# added after the first results.csv files; read_results fills them in with what those rows were measured with
# (every config had choice_temperature 4.5 and no temperature key then)
LATER_FIELDS = {"ordering": "confidence", "temperature": "1", "choice_temperature": "4.5", "holes": "strokes"}
HOLES = {"strokes": "stroke", "boxes": "box"}  # --holes -> utils.masks hole kind
REFERENCES = {"telea": "OpenCV Telea (radius 3)", "oracle": "oracle: ground-truth tokens",
              "oracle_blend": "oracle + seam blend", "masked_input": "masked input as is",
              "diffusion_fill": "diffusion fill (no learning)",
              "fill_tokens": "no transformer: tokens of the diffusion fill + seam blend"}
REFERENCE_COLORS = {"telea": "k", "oracle": "C7", "oracle_blend": "C7", "masked_input": "C3", "diffusion_fill": "C5",
                    "fill_tokens": "C8"}
TELEA_RADIUS = 3


@dataclass(frozen=True)
class Setting:
    """One MaskGIT row of the sweep; the sweet-spot flag is kept as given (T, a step or a fraction)."""
    schedule: str
    total_iter: int
    sweet_spot_flag: str
    decoding: str
    pixel_guidance: float = 0.0
    seam_blend: bool = False
    ordering: str = "confidence"
    temperature: str = "1"  # a temperature_flag
    choice_temperature: float = 4.5

    @property
    def sweet_spot(self) -> int:
        return sweet_spot_step(self.sweet_spot_flag, self.total_iter)

    @property
    def key(self) -> tuple[str, ...]:
        return ("maskgit", self.schedule, str(self.total_iter), self.sweet_spot_flag, self.decoding, self.ordering,
                self.temperature, str(self.choice_temperature), str(self.pixel_guidance), on_off(self.seam_blend))

    def inpaint_kwargs(self) -> dict[str, object]:
        """This setting as keyword arguments of sampler.maskgit_sampler.inpaint."""
        temperature, final_temperature = parse_temperature(self.temperature)
        return dict(total_iter=self.total_iter, gamma_type=self.schedule, sweet_spot=self.sweet_spot,
                    argmax=self.decoding == "argmax", pixel_guidance=self.pixel_guidance, seam_blend=self.seam_blend,
                    ordering=self.ordering, temperature=temperature, final_temperature=final_temperature,
                    choice_temperature=self.choice_temperature)

    def row(self, images: int, seed: int, split: str, holes: str) -> dict[str, object]:
        """Its results.csv row, without fid and seconds."""
        return dict(method="maskgit", schedule=self.schedule, T=self.total_iter, sweet_spot=self.sweet_spot,
                    sweet_spot_flag=self.sweet_spot_flag, decoding=self.decoding, ordering=self.ordering,
                    temperature=self.temperature, choice_temperature=self.choice_temperature,
                    pixel_guidance=self.pixel_guidance, seam_blend=on_off(self.seam_blend), images=images, seed=seed,
                    split=split, holes=holes)

    @property
    def label(self) -> str:
        extra = "" if self.pixel_guidance == 0 else f" guidance {self.pixel_guidance:g}"
        return (f"{self.schedule} T={self.total_iter} sweet spot {self.sweet_spot} {self.decoding} {self.ordering} "
                f"temperature {self.temperature} choice temperature {self.choice_temperature:g}"
                f"{extra}{' seam blend' if self.seam_blend else ''}")


def reference_row(method: str, images: int, split: str, holes: str) -> dict[str, object]:
    """The results.csv row of a reference method, without fid and seconds: no decoding settings, no seed."""
    return dict(method=method, schedule="", T="", sweet_spot="", sweet_spot_flag="", decoding="", ordering="",
                temperature="", choice_temperature="", pixel_guidance="", seam_blend="", images=images, seed="", split=split, holes=holes)


def on_off(flag: bool) -> str:
    return "on" if flag else "off"


def sweet_spot_step(flag: str, total_iter: int) -> int:
    """'T' -> T; '0.5' (a fraction, it has a dot) -> round(0.5*T) half up, at least 1; '3' -> step 3."""
    if flag == "T":
        return total_iter
    if "." in flag:
        return max(1, math.floor(float(flag) * total_iter + 0.5))
    return int(flag)


def temperature_flag(temperature: float, final_temperature: float | None = None) -> str:
    """'0.7' for a constant temperature, '1.5:0.5' for one annealed from 1.5 to 0.5 (sampler docstring)."""
    return f"{temperature:g}" if final_temperature is None else f"{temperature:g}:{final_temperature:g}"


def parse_temperature(flag: str) -> tuple[float, float | None]:
    """A temperature_flag -> (temperature, final_temperature or None); ValueError if it is not one."""
    values = [float(v) for v in flag.split(":")]
    if not 1 <= len(values) <= 2 or not all(v > 0 for v in values):
        raise ValueError(flag)
    return values[0], values[1] if len(values) == 2 else None


def sweet_spot_error(flag: str, min_total_iter: int) -> str | None:
    if flag == "T":
        return None
    if flag.isdigit():
        if not 1 <= int(flag) <= min_total_iter:
            return f"--sweet-spots {flag}: a step must be between 1 and the smallest --total-iters ({min_total_iter})"
        return None
    try:
        fraction = float(flag) if "." in flag else None
    except ValueError:
        fraction = None
    if fraction is None or not 0 < fraction <= 1:
        return f"--sweet-spots {flag}: use T, a step (e.g. 4) or a fraction of T in (0, 1] (e.g. 0.5)"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--mask-funcs", nargs="+", choices=list(GAMMAS), default=["cosine", "linear", "square"])
    p.add_argument("--total-iters", nargs="+", type=int, default=[1, 2, 4, 8, 12], help="decoding steps T")
    p.add_argument("--sweet-spots", nargs="+", default=["T"], help="T, a step, or a fraction of T such as 0.5")
    p.add_argument("--decodings", nargs="+", choices=DECODINGS, default=list(DECODINGS))
    p.add_argument("--orderings", nargs="+", choices=ORDERINGS, default=None,
                   help="which masked tokens each step fixes (sampler docstring; default: the config's `ordering`, "
                        "else confidence)")
    p.add_argument("--temperatures", nargs="+", default=None,
                   help="sampling temperatures: 0.7 (constant) or 1.5:0.5 (annealed linearly over the steps; sampler "
                        "docstring); default: the config's")
    p.add_argument("--choice-temperatures", nargs="+", type=float, default=None,
                   help="Gumbel noise scales of the confidence ranking (default: the config's choice_temperature)")
    p.add_argument("--pixel-guidances", nargs="+", type=float, default=None,
                   help="pixel-guidance strengths (sampler docstring; default: the config's `pixel_guidance`, else 0)")
    p.add_argument("--seam-blends", nargs="+", choices=["on", "off"], default=None,
                   help="seam blend on/off (sampler docstring; default: the config's `seam_blend`, else off)")
    p.add_argument("--only-references", action="store_true", help="only the reference rows")
    p.add_argument("--references", nargs="*", choices=list(REFERENCES), default=list(REFERENCES),
                   help="which reference rows to measure (default: all; none: --references with no value)")
    p.add_argument("--resume", action="store_true", help="keep results.csv and skip the settings already in it")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32, help="images per transformer / VQGAN / Inception batch")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="test: the prepared masked test set; val: --val_d_path with stroke holes (for tuning)")
    p.add_argument("--holes", choices=list(HOLES), default="strokes",
                   help="strokes: the test set's kind of holes (on test: its prepared masks); boxes: one large box per "
                        "image, from a fixed seed per split")
    p.add_argument("--val_d_path", default="./cat_face/val/", help="clean val images, used with --split val")
    p.add_argument("--partial", type=float, default=1.0, help="fraction of the set to use (the first ones)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--MaskGitConfig", default="configs/MaskGit_demo.yml", help="MaskGit YAML config (default: the "
                   "shipped models and the decoding chosen on val)")
    p.add_argument("--load-transformer-ckpt-path", default=None,
                   help="transformer weights (default: model_param.transformer_ckpt of the config, else "
                        f"{DEFAULT_TRANSFORMER_CKPT})")
    p.add_argument("--test-maskedimage-path", default="./cat_face/masked_image")
    p.add_argument("--test-mask-path", default="./cat_face/mask64")
    p.add_argument("--gt", default=None, help="ground truth: test_gt.csv or a folder of images (default: auto-detect)")
    p.add_argument("--dims", type=int, choices=[64, 192, 768, 2048], default=2048,
                   help="Inception features for FID: 2048 is standard; 64/192/768 only for quick checks")
    p.add_argument("--figure-images", type=int, default=4, help="test images in decoding_figure.png (0: no figure)")
    p.add_argument("--faces", type=int, default=0,
                   help="images in faces.png: masked input / fill of the first setting / truth (0: no faces.png)")
    p.add_argument("--output-dir", default="./experiments_out")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if args.temperatures is not None:
        try:
            args.temperatures = [temperature_flag(*parse_temperature(f)) for f in args.temperatures]
        except ValueError as e:
            p.error(f"--temperatures {e}: use a temperature > 0 (e.g. 0.7) or START:END to anneal (e.g. 1.5:0.5)")
    for name in ("mask_funcs", "decodings", "total_iters", "sweet_spots", "pixel_guidances", "seam_blends",
                 "temperatures", "choice_temperatures", "orderings"):  # each setting once, in the order given
        if getattr(args, name) is not None:
            setattr(args, name, list(dict.fromkeys(getattr(args, name))))
    for name in ("pixel_guidances", "choice_temperatures"):
        if getattr(args, name) is not None and min(getattr(args, name)) < 0:
            p.error(f"--{name.replace('_', '-')} must all be >= 0, got {min(getattr(args, name))}")
    if min(args.total_iters) < 1:
        p.error(f"--total-iters must all be >= 1, got {min(args.total_iters)}")
    for flag in args.sweet_spots:
        if (message := sweet_spot_error(flag, min(args.total_iters))) is not None:
            p.error(message)
    if args.batch_size < 1 or args.figure_images < 0 or args.faces < 0:
        p.error("--batch-size must be >= 1, --figure-images and --faces >= 0")
    if not 0 < args.partial <= 1:
        p.error(f"--partial must be in (0, 1], got {args.partial}")
    return args


def sweep(args: argparse.Namespace) -> list[Setting]:
    return [Setting(s, t, f, d, g, b == "on", o, temp, c) for s, d, o, temp, c, g, b, f, t in
            itertools.product(args.mask_funcs, args.decodings, args.orderings, args.temperatures,
                              args.choice_temperatures, args.pixel_guidances, args.seam_blends, args.sweet_spots,
                              args.total_iters)]


def telea_inpaint(masked: np.ndarray, known: np.ndarray, radius: int = TELEA_RADIUS) -> np.ndarray:
    """OpenCV's Telea inpainting of uint8 [N, H, W, 3] images with bool [N, H, W] known masks (it works per
    channel, so RGB order is fine, and it leaves the known pixels as they are)."""
    return np.stack([cv2.inpaint(m, (~k).astype(np.uint8) * 255, radius, cv2.INPAINT_TELEA)
                     for m, k in zip(masked, known)])


def oracle_inpaint(model: MaskGit, gt: np.ndarray, masked: np.ndarray, known: np.ndarray, batch_size: int,
                   device: torch.device, split: str = "test", seam_blend: bool = False) -> np.ndarray:
    """The ground truth's own VQGAN tokens decoded, known pixels pasted back from the masked input: what a
    transformer that predicts every token right would give, i.e. the FID this VQGAN leaves reachable."""
    return _decode_tokens_of(model, gt, masked, known, batch_size, device, split, seam_blend)


def fill_tokens_inpaint(model: MaskGit, masked: np.ndarray, known: np.ndarray, batch_size: int,
                        device: torch.device, split: str = "test") -> np.ndarray:
    """No transformer: the VQGAN tokens of the diffusion-filled image, decoded and seam-blended."""
    return _decode_tokens_of(model, diffusion_fill(masked, known), masked, known, batch_size, device, split, True)


def _decode_tokens_of(model: MaskGit, source: np.ndarray, masked: np.ndarray, known: np.ndarray, batch_size: int,
                      device: torch.device, split: str, seam_blend: bool) -> np.ndarray:
    """Tokenize `source` (uint8), decode, paste the known pixels of `masked` back."""
    out = []
    for s in range(0, len(source), batch_size):
        batch = slice(s, s + batch_size)
        tokens = model.tokenize(uint8_to_tensor(source[batch]).to(device), split)
        out.append(tokens_to_uint8(model, tokens, masked[batch], torch.from_numpy(known[batch, None]), split,
                                   seam_blend))
    return np.concatenate(out)


def diffusion_fill(masked: np.ndarray, known: np.ndarray) -> np.ndarray:
    """utils.image.diffuse_fill on uint8 images [N, H, W, 3] with bool [N, H, W] known masks."""
    filled = diffuse_fill(uint8_to_tensor(masked), torch.from_numpy(known[:, None]))
    return to_uint8(filled)


def inpaint_set(model: MaskGit, loader: DataLoader, device: torch.device, seed: int, **kwargs) -> np.ndarray:
    """MaskGIT-inpaint every image of `loader` (kwargs go to sampler.inpaint) -> uint8 [N, H, W, 3]."""
    generator = torch.Generator(device).manual_seed(seed)
    return np.concatenate([inpaint(model, images.to(device), known.to(device), generator=generator,
                                   amp=resolve_amp("auto", device), **kwargs).images
                           for images, known, _ in tqdm(loader, desc="inpainting", unit="batch", leave=False)])


class FIDScorer:
    """FID against one fixed ground truth, whose Inception statistics are computed once, on first use (and cached
    on disk by the FID tool)."""

    def __init__(self, gt: np.ndarray, device: torch.device, batch_size: int, dims: int):
        self.gt, self.device = gt, device
        self.kwargs = dict(device=device, batch_size=batch_size, dims=dims)

    @cached_property
    def gt_statistics(self) -> tuple[np.ndarray, np.ndarray]:
        return compute_statistics(self.gt, cache=True, desc="ground-truth features", **self.kwargs)

    def __call__(self, images: np.ndarray) -> float:
        mu, sigma = compute_statistics(images, desc="FID features", **self.kwargs)
        return frechet_distance(mu, sigma, *self.gt_statistics, device=self.device)


def row_key(row: dict[str, str]) -> tuple[str, ...]:
    return tuple(row[k] for k in ("method", "schedule", "T", "sweet_spot_flag", "decoding", "ordering", "temperature",
                                  "choice_temperature", "pixel_guidance", "seam_blend"))


def read_results(path: Path) -> list[dict[str, str]]:
    """The rows of a results.csv; a column of LATER_FIELDS that a file lacks reads as its value there (on MaskGIT
    rows; reference rows have no decoding, only holes)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != [k for k in FIELDS if k in (reader.fieldnames or []) or k not in LATER_FIELDS]:
            raise ValueError(f"{path}: not a results.csv of experiments.py (columns {reader.fieldnames}); "
                             "move it away or drop --resume")
        rows = list(reader)
    for row in rows:
        for key, value in LATER_FIELDS.items():
            row.setdefault(key, value if row["method"] == "maskgit" or key == "holes" else "")
    return rows


def write_results(path: Path, rows: list[dict[str, str]]) -> None:
    """Rewrite results.csv with FIELDS as its columns (so that the rows appended next line up)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(text.getvalue(), path)


def append_row(path: Path, row: dict[str, object]) -> None:
    """Append one row (writing the header first into a new file), flushed at once: an interrupted sweep keeps it."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def previous_rows(path: Path, resume: bool, images: int, seed: int, split: str, holes: str
                  ) -> dict[tuple[str, ...], dict[str, str]]:
    """The rows already measured when resuming; otherwise an old results.csv is replaced."""
    if not resume:
        if path.exists():
            print(f"note: replacing {path} (pass --resume to continue it instead)", file=sys.stderr)
            path.unlink()
        return {}
    if not path.exists():
        return {}
    rows = read_results(path)
    for row in rows:
        if (row["images"] != str(images) or row["split"] != split or row["holes"] != holes
                or (row["method"] == "maskgit" and row["seed"] != str(seed))):
            raise ValueError(f"{path}: rows were measured on {row['images']} {row['split']} images with {row['holes']} "
                             f"and seed {row['seed'] or '-'}, this run uses {images} {split} images with {holes} and "
                             f"seed {seed}; resume with the same --split, --holes, --partial and --seed, or drop "
                             "--resume to start over")
    write_results(path, rows)
    return {row_key(row): row for row in rows}


def sorted_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """References first (in REFERENCES order), then MaskGIT rows by schedule, decoding, ordering, temperatures,
    guidance, blend, sweet spot and T."""
    order = [*REFERENCES, "maskgit"]
    return sorted(rows, key=lambda r: (order.index(r["method"]), r["schedule"], r["decoding"], r["ordering"],
                                       r["temperature"], float(r["choice_temperature"] or 0),
                                       float(r["pixel_guidance"] or 0), r["seam_blend"], r["sweet_spot_flag"],
                                       int(r["T"] or 0)))


def write_markdown(rows: list[dict[str, str]], path: Path) -> str:
    lines = [f"FID on {rows[0]['images']} {rows[0]['split']} images with {rows[0]['holes']} holes (lower is better); "
             "seconds: wall time of inpainting the set.", "",
             "| schedule | T | sweet spot | decoding | ordering | temperature | choice temperature | pixel guidance "
             "| seam blend | FID | seconds |",
             "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in sorted_rows(rows):
        name = REFERENCES.get(r["method"], r["schedule"])
        lines.append(f"| {name} | {r['T'] or '-'} | {r['sweet_spot'] or '-'} | {r['decoding'] or '-'} | "
                     f"{r['ordering'] or '-'} | {r['temperature'] or '-'} | {r['choice_temperature'] or '-'} | "
                     f"{r['pixel_guidance'] or '-'} | {r['seam_blend'] or '-'} | "
                     f"{float(r['fid']):.2f} | {float(r['seconds']):.2f} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot_fid_vs_t(rows: list[dict[str, str]], path: Path) -> None:
    """One line per (schedule, decoding, ordering, temperatures, guidance, blend, sweet spot): colour = schedule,
    dashes = argmax,
    marker = sweet spot (hollow: halton ordering), thicker = pixel guidance or seam blend on; references as dotted
    horizontal lines."""
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    maskgit = [r for r in sorted_rows(rows) if r["method"] == "maskgit"]
    colors = {s: f"C{i}" for i, s in enumerate(dict.fromkeys(r["schedule"] for r in maskgit))}
    markers = dict(zip(dict.fromkeys(r["sweet_spot_flag"] for r in maskgit), itertools.cycle("os^vDP*X")))
    for (schedule, decoding, ordering, temperature, choice, guidance, blend, flag), group in itertools.groupby(
            maskgit, key=lambda r: (r["schedule"], r["decoding"], r["ordering"], r["temperature"],
                                    r["choice_temperature"], r["pixel_guidance"], r["seam_blend"], r["sweet_spot_flag"])):
        group = list(group)
        improved = float(guidance) > 0 or blend == "on"
        label = (f"{schedule}, {decoding}" + ("" if ordering == "confidence" else f", {ordering}")
                 + ("" if temperature == "1" else f", temperature {temperature}")
                 + ("" if choice == "4.5" else f", choice temperature {choice}")
                 + ("" if flag == "T" else f", sweet spot {flag}")
                 + (f", guidance {float(guidance):g}" if float(guidance) > 0 else "")
                 + (", seam blend" if blend == "on" else ""))
        ax.plot([int(r["T"]) for r in group], [float(r["fid"]) for r in group], color=colors[schedule],
                linestyle="--" if decoding == "argmax" else "-", marker=markers[flag], label=label,
                markerfacecolor="none" if ordering == "halton" else None,
                linewidth=2.5 if improved else 1.2)
    for r in sorted_rows(rows):
        if r["method"] in REFERENCES:
            fid = float(r["fid"])
            ax.axhline(fid, color=REFERENCE_COLORS[r["method"]], linestyle=":",
                       label=f"{REFERENCES[r['method']]} ({fid:.1f})")
    if maskgit:
        ax.set_xticks(sorted({int(r["T"]) for r in maskgit}))
    # the masked input is far above everything else on real data: it stays in the legend, not in the y range
    focus = [float(r["fid"]) for r in rows if r["method"] != "masked_input"]
    margin = 0.05 * (max(focus) - min(focus)) + 0.5
    ax.set_ylim(min(focus) - margin, max(focus) + margin)
    ax.set_xlabel("decoding steps T")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(f"Inpainting FID on {rows[0]['images']} {rows[0]['split']} images, {rows[0]['holes']} holes")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")


def decoding_mosaic(model: MaskGit, dataset: InpaintingTestSet, gt: np.ndarray, count: int, schedules: list[str],
                    setting: Setting, seed: int, device: torch.device) -> tuple[np.ndarray, list[str], list[str]]:
    """uint8 mosaic with one row per (test image, schedule), image-major: the masked input, then the latent mask
    (white = known) and the decoded image after each of the T steps of `setting` (its full decode, with each of the
    schedules), then the ground truth. Returns it with its row and column labels."""
    total_iter = setting.total_iter
    images = torch.stack([dataset[i][0] for i in range(count)]).to(device)
    known = torch.stack([dataset[i][1] for i in range(count)]).to(device)
    rows = {}
    for schedule in schedules:
        generator = torch.Generator(device).manual_seed(seed)
        kwargs = replace(setting, schedule=schedule, sweet_spot_flag="T").inpaint_kwargs()
        result = inpaint(model, images, known, split=dataset.split, generator=generator,
                         amp=resolve_amp("auto", device), keep_steps=True, **kwargs)
        masks, steps = step_tiles(model, result, list(range(count)), known, paste_back=True)
        for i in range(count):
            interleaved = np.stack([masks[i], steps[i]], axis=1).reshape(-1, *steps.shape[2:])
            rows[i, schedule] = strip(np.concatenate([result.masked[i][None], interleaved, gt[i][None]]))
    row_labels = [f"{dataset.names[i]}\n{s}" for i in range(count) for s in schedules]
    col_labels = ["input", *(f"{kind} {t}" for t in range(1, total_iter + 1) for kind in ("mask", "step")), "truth"]
    return np.concatenate([rows[i, s] for i in range(count) for s in schedules]), row_labels, col_labels


def faces_mosaic(model: MaskGit, dataset: InpaintingTestSet, gt: np.ndarray, count: int, setting: Setting, seed: int,
                 device: torch.device) -> tuple[np.ndarray, list[str], list[str]]:
    """uint8 mosaic of the first `count` images side by side: masked input, the fill of `setting`, ground truth (one
    row each). Returns it with its row and column labels."""
    images = torch.stack([dataset[i][0] for i in range(count)]).to(device)
    known = torch.stack([dataset[i][1] for i in range(count)]).to(device)
    generator = torch.Generator(device).manual_seed(seed)
    result = inpaint(model, images, known, split=dataset.split, generator=generator, amp=resolve_amp("auto", device),
                     **setting.inpaint_kwargs())
    mosaic = np.concatenate([strip(result.masked), strip(result.images), strip(gt[:count])])
    return mosaic, ["masked input", "our fill", "truth"], [dataset.names[i] for i in range(count)]


def save_mosaic(mosaic: np.ndarray, row_labels: list[str], col_labels: list[str], path: Path, title: str) -> None:
    """The mosaic at 2 figure pixels per image pixel, with labelled rows and columns."""
    h, w = mosaic.shape[:2]
    fig = Figure(figsize=(w / 50 + 1.2, h / 50 + 0.8), dpi=100)
    ax = fig.subplots()
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks((np.arange(len(col_labels)) + 0.5) * w / len(col_labels), col_labels, fontsize=8)
    ax.set_yticks((np.arange(len(row_labels)) + 0.5) * h / len(row_labels), row_labels, fontsize=8)
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=10)
    fig.savefig(path, bbox_inches="tight")


def test_set(args: argparse.Namespace) -> tuple[InpaintingTestSet, np.ndarray]:
    """The prepared masked test images and their ground truth; with --holes boxes, the ground truth with the test
    split's fixed box holes instead of the prepared masks."""
    dataset = load_test_set(args.test_maskedimage_path, args.test_mask_path)
    gt = ground_truth_of(dataset, args.gt, args.test_maskedimage_path)
    if gt is None:
        raise ValueError(f"no test_gt.csv or test_gt/ beside {args.test_maskedimage_path}; pass --gt")
    if args.holes == "boxes":
        dataset = InpaintingTestSet.with_holes(gt, dataset.names, fixed_holes("box", len(gt), "test"), split="test")
    return dataset, gt


def val_set(args: argparse.Namespace) -> tuple[InpaintingTestSet, np.ndarray]:
    """The clean val images with their fixed holes of the --holes kind (utils.masks.fixed_holes); the clean images
    are the ground truth."""
    clean = ImageFolderDataset(args.val_d_path, split="val")
    holes = fixed_holes(HOLES[args.holes], len(clean.images), "val")
    return InpaintingTestSet.with_holes(clean.images, [p.name for p in clean.paths], holes), clean.images


def reference_inpaint(method: str, model: MaskGit, gt: np.ndarray, masked: np.ndarray, known: np.ndarray,
                      batch_size: int, device: torch.device, split: str) -> np.ndarray:
    """The images of one reference row (REFERENCES)."""
    if method == "telea":
        return telea_inpaint(masked, known)
    if method in ("oracle", "oracle_blend"):
        return oracle_inpaint(model, gt, masked, known, batch_size, device, split, seam_blend=method == "oracle_blend")
    if method == "diffusion_fill":
        return diffusion_fill(masked, known)
    if method == "fill_tokens":
        return fill_tokens_inpaint(model, masked, known, batch_size, device, split)
    return masked


def measure(make: Callable[[], np.ndarray], score: FIDScorer, row: dict[str, object], csv_path: Path) -> str:
    """Time `make` (the inpainting only), score its images and append the row at once; returns FID and time."""
    start = time.perf_counter()
    images = make()
    seconds = time.perf_counter() - start
    fid = score(images)
    append_row(csv_path, {**row, "fid": fid, "seconds": seconds})
    return f"FID {fid:.2f} ({seconds:.1f} s)"


def save_decoding_figure(args: argparse.Namespace, model: MaskGit, dataset: InpaintingTestSet, gt: np.ndarray,
                         count: int, device: torch.device, path: Path) -> None:
    """decoding_figure.png: every schedule at the largest T, with the first of every other setting asked."""
    first = replace(sweep(args)[0], total_iter=max(args.total_iters))
    mosaic, row_labels, col_labels = decoding_mosaic(model, dataset, gt, count, args.mask_funcs, first, args.seed,
                                                     device)
    save_mosaic(mosaic, row_labels, col_labels, path, f"iterative decoding, {args.holes} holes, "
                f"{first.label.split(' ', 1)[1].replace(' sweet spot ' + str(first.sweet_spot), '', 1)}")


def run(args: argparse.Namespace) -> None:
    device = check_device(args.device)
    out_dir = ensure_writable_dir(args.output_dir, "--output-dir")
    cfg = load_maskgit_config(args.MaskGitConfig)
    dataset, gt = val_set(args) if args.split == "val" else test_set(args)
    n = math.ceil(args.partial * len(dataset))
    if n < 2:
        raise ValueError(f"--partial {args.partial} leaves {n} image; FID needs at least 2")
    gt, masked, known = gt[:n], dataset.images[:n], dataset.known[:n]
    defaults = decoding_choices(cfg, args.MaskGitConfig)
    if args.pixel_guidances is None:
        args.pixel_guidances = [defaults["pixel_guidance"]]
    if args.seam_blends is None:
        args.seam_blends = [on_off(defaults["seam_blend"])]
    if args.orderings is None:
        args.orderings = [defaults["ordering"]]
    if args.temperatures is None:
        args.temperatures = [temperature_flag(defaults["temperature"], defaults["final_temperature"])]
    if args.choice_temperatures is None:
        args.choice_temperatures = [float(cfg["choice_temperature"])]
    model = MaskGit(cfg).to(device).eval()
    if not args.only_references:
        model.load_transformer_checkpoint(transformer_ckpt_path(cfg, args.load_transformer_ckpt_path))

    csv_path = out_dir / "results.csv"
    done = previous_rows(csv_path, args.resume, n, args.seed, args.split, args.holes)
    references = [m for m in args.references if row_key(reference_row(m, n, args.split, args.holes)) not in done]
    settings = [] if args.only_references else [s for s in sweep(args) if s.key not in done]
    if done:
        print(f"resuming {csv_path}: {len(done)} rows already measured", file=sys.stderr)
    score = FIDScorer(gt, device, args.batch_size, args.dims)
    loader = DataLoader(Subset(dataset, range(n)), batch_size=args.batch_size, shuffle=False)
    with tqdm(total=len(references) + len(settings), desc="study", unit="row") as bar:
        for method in references:
            result = measure(lambda: reference_inpaint(method, model, gt, masked, known, args.batch_size, device,
                                                       dataset.split),
                             score, reference_row(method, n, args.split, args.holes), csv_path)
            bar.write(f"{REFERENCES[method]}: {result}")
            bar.update()
        for s in settings:
            result = measure(lambda: inpaint_set(model, loader, device, args.seed, split=dataset.split,
                                                 **s.inpaint_kwargs()),
                             score, s.row(n, args.seed, args.split, args.holes), csv_path)
            bar.write(f"{s.label}: {result}")
            bar.update()

    figure = not args.only_references and args.figure_images > 0
    if figure:
        save_decoding_figure(args, model, dataset, gt, min(args.figure_images, n), device,
                             out_dir / "decoding_figure.png")
    faces = not args.only_references and args.faces > 0
    if faces:
        first = sweep(args)[0]
        mosaic, row_labels, col_labels = faces_mosaic(model, dataset, gt, min(args.faces, n), first, args.seed, device)
        save_mosaic(mosaic, row_labels, col_labels, out_dir / "faces.png",
                    f"{args.split} faces, {args.holes} holes: {first.label}")
    rows = read_results(csv_path)
    print(write_markdown(rows, out_dir / "results.md"), end="")
    plot_fid_vs_t(rows, out_dir / "fid_vs_T.png")
    pictures = "".join(f", {name}" for name, made in (("decoding_figure.png", figure), ("faces.png", faces)) if made)
    print(f"wrote results.csv, results.md, fid_vs_T.png{pictures} in {out_dir}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # every finished row is already in results.csv when Ctrl-C comes
    return run_cli(lambda: run(args), debug=args.debug,
                   interrupted=f"interrupted; rerun with --resume to continue {Path(args.output_dir) / 'results.csv'}")


if __name__ == "__main__":
    sys.exit(main())
