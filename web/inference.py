"""Inpainting for the interactive page (app.py): one face, one hole, a few samples side by side, and the frames
of every decoding step (the lab's `mask_scheduling` and `imga` strips), yielded one step at a time.

Kept apart from the server so that it is tested and timed as plain functions. Faces are uint8 [64, 64, 3], holes
bool [64, 64] (True = hole); everything a user can get wrong raises InputError, whose message the page shows.
"""
from __future__ import annotations

import io
import math
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from models.schedules import GAMMAS
from models.VQGAN_Transformer import ORDERINGS, MaskGit, decoding_choices, load_maskgit_config, transformer_ckpt_path
from sampler.latent_mask import latent_known_mask
from sampler.maskgit_sampler import inpaint, tokens_to_uint8
from utils.image import HOLE_GRAY, IMAGE_SIZE, normalize, uint8_to_tensor
from utils.masks import box_mask, stroke_mask
from utils.precision import resolve_amp

SPLIT = "test"  # normalization statistics: those the shipped models are scored with (inpainting.py)
MAX_UPLOAD_BYTES = 10 * 2 ** 20
MAX_UPLOAD_PIXELS = 50_000_000  # a small file can still decode to a huge image (a "decompression bomb")
MAX_STEPS = 32
MAX_SAMPLES = 6


class InputError(ValueError):
    """A request the page answers with this one-line message (bad upload, bad setting), never a traceback."""


@dataclass(frozen=True)
class DecodeSettings:
    """The decoding a user sets on the page; these defaults are the lab's, load_engine takes the config's."""
    schedule: str = "cosine"
    total_iter: int = 8
    sweet_spot: int | None = None  # None: the last step
    decoding: str = "sample"
    ordering: str = "confidence"
    temperature: float = 1.0
    final_temperature: float | None = None  # None: constant (the sampler's annealing, set in the config)
    pixel_guidance: float = 0.0
    seam_blend: bool = False
    seed: int = 0
    samples: int = 1

    def checked(self) -> "DecodeSettings":
        """Self, or InputError naming the first setting out of range."""
        rules = [
            (self.schedule in GAMMAS, f"schedule must be one of {', '.join(GAMMAS)}"),
            (1 <= self.total_iter <= MAX_STEPS, f"T must be between 1 and {MAX_STEPS}"),
            (self.sweet_spot is None or 1 <= self.sweet_spot <= self.total_iter,
             f"the sweet spot must be between 1 and T ({self.total_iter})"),
            (self.decoding in ("argmax", "sample"), "decoding must be argmax or sample"),
            (self.ordering in ORDERINGS, f"ordering must be {' or '.join(ORDERINGS)}"),
            (0 < self.temperature <= 100, "the temperature must be > 0 and <= 100"),
            (self.final_temperature is None or 0 < self.final_temperature <= 100,
             "the final temperature must be > 0 and <= 100"),
            (0 <= self.pixel_guidance <= 1000, "pixel guidance must be between 0 and 1000"),
            (0 <= self.seed < 2 ** 63, "the seed must be a whole number >= 0"),
            (1 <= self.samples <= MAX_SAMPLES, f"samples must be between 1 and {MAX_SAMPLES}"),
        ]
        for ok, message in rules:
            if not ok:
                raise InputError(message)
        return self

    def updated(self, values: dict[str, Any]) -> "DecodeSettings":
        """These settings with `values` (e.g. parsed JSON) applied; InputError for unknown keys and wrong types."""
        parsed = {}
        for key, value in values.items():
            if key not in _SETTING_TYPES:
                raise InputError(f"unknown setting {key!r}")
            kind = _SETTING_TYPES[key]
            accepted = (int, float) if kind is float else kind
            ok = (key in ("sweet_spot", "final_temperature") and value is None) or (
                isinstance(value, accepted) and (kind is bool or not isinstance(value, bool))
                and (kind is not float or _finite(value)))
            if not ok:
                raise InputError(f"setting {key} is {value!r}; expected {_KIND_NAMES[kind]}")
            parsed[key] = float(value) if kind is float and value is not None else value
        return replace(self, **parsed).checked()


_SETTING_TYPES = {"schedule": str, "total_iter": int, "sweet_spot": int, "decoding": str, "ordering": str,
                  "temperature": float, "final_temperature": float, "pixel_guidance": float, "seam_blend": bool,
                  "seed": int, "samples": int}
_KIND_NAMES = {str: "a name", int: "a whole number", float: "a number", bool: "true or false"}


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


@dataclass
class Engine:
    """The model, loaded once, and the lock that lets one request at a time compute: on a small CPU, parallel
    requests would only fight over the same cores, so a request holds it for its whole decode (its steps stream
    out meanwhile) and the next one waits. amp: bf16 autocast only where it pays (utils.precision); on an AVX2
    CPU it made one inpainting ~9x slower."""
    model: MaskGit
    defaults: DecodeSettings
    device: torch.device
    amp: str = "none"
    lock: threading.Lock = field(default_factory=threading.Lock)


def load_engine(config_path: str | Path, device: str | torch.device = "cpu") -> Engine:
    """The MaskGit of a config (VQGAN and transformer checkpoints as inpainting.py finds them) and its decoding."""
    cfg = load_maskgit_config(config_path)
    device = torch.device(device)
    model = MaskGit(cfg).to(device).eval()
    model.load_transformer_checkpoint(transformer_ckpt_path(cfg))
    chosen = decoding_choices(cfg, str(config_path))
    defaults = DecodeSettings(schedule=cfg["gamma_type"], decoding=chosen["decoding"], ordering=chosen["ordering"],
                              temperature=chosen["temperature"], final_temperature=chosen["final_temperature"],
                              pixel_guidance=chosen["pixel_guidance"], seam_blend=chosen["seam_blend"])
    return Engine(model, defaults, device, amp=resolve_amp("auto", device))


def _to_rgb8(im: Image.Image, sixteen_bit: bool) -> tuple[Image.Image, list[str]]:
    """An 8-bit RGB copy of a loaded PIL image: 16-bit gray is scaled down (PIL keeps the high byte of 16-bit
    colour itself), transparency is laid on white."""
    notes = ["16-bit image reduced to 8 bits"] if sixteen_bit else []
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit gray (or 32-bit integer)
        a = np.asarray(im).astype(np.float64)
        if sixteen_bit or a.max(initial=0) > 255:
            a = a / 257
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        raise InputError("32-bit float images are not supported; save it as 8-bit RGB (PNG or JPEG)")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        notes.append("alpha channel dropped: transparent parts laid on white")
    return im.convert("RGB"), notes


def read_image(data: bytes) -> tuple[np.ndarray, list[str]]:
    """Any image file -> (uint8 [64, 64, 3], notes): EXIF rotation applied, center-cropped to a square and resized
    to 64x64 (the models' size). InputError for empty, oversized, damaged or non-image data."""
    if not data:
        raise InputError("the file is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise InputError(f"the file is {len(data) / 2 ** 20:.1f} MB; the limit is {MAX_UPLOAD_BYTES // 2 ** 20} MB")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_UPLOAD_PIXELS:
                raise InputError(f"the image is {im.width}x{im.height} pixels; the limit is "
                                 f"{MAX_UPLOAD_PIXELS // 10 ** 6} megapixels")
            sixteen_bit = any(";16" in str(tile.args) for tile in im.tile)  # the raw layout, known before decoding
            im.load()
            im, notes = _to_rgb8(ImageOps.exif_transpose(im), sixteen_bit)
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError("not an image file (or a format this page cannot read); use PNG or JPEG") from None
    except Exception as e:  # PIL reports damaged files through many exception types
        raise InputError(f"cannot read the file as an image ({type(e).__name__}: {e})") from None
    w, h = im.size
    if (w, h) != (IMAGE_SIZE, IMAGE_SIZE):
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        im = im.crop(box).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
        notes.append(f"center-cropped from {w}x{h} to {side}x{side} and resized to {IMAGE_SIZE}x{IMAGE_SIZE}")
    return np.asarray(im, dtype=np.uint8).copy(), notes


def random_hole(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A random hole, bool [64, 64]: "stroke" (the test set's brush strokes) or "box" (the val box holes' kind),
    both from utils.masks."""
    if kind == "stroke":
        return stroke_mask(rng)
    if kind != "box":
        raise InputError(f"unknown hole kind {kind!r}; use stroke or box")
    return box_mask(rng)


def _latent_tile(known_tokens: torch.Tensor) -> np.ndarray:
    """bool [B, N] (True = known) -> uint8 [B, 64, 64], white = known, each token a square patch."""
    res = int(known_tokens.shape[1] ** 0.5)
    grid = known_tokens.view(-1, res, res).cpu().numpy().astype(np.uint8) * 255
    return np.kron(grid, np.ones((1, IMAGE_SIZE // res, IMAGE_SIZE // res), np.uint8))


class _Stopped(Exception):
    """Raised in the worker when the reader of its events has gone, so that its decode ends and frees the engine."""


def _from_worker(work: Callable[[Callable[[dict[str, Any]], None]], None]) -> Iterator[dict[str, Any]]:
    """Run work(emit) in a thread and yield each event it emits as soon as it is emitted; an exception in the
    worker is raised here. When the reader stops early (closes this generator), the worker's next emit stops it."""
    events: queue.Queue = queue.Queue()
    done, gone = object(), threading.Event()

    def emit(event: dict[str, Any]) -> None:
        if gone.is_set():
            raise _Stopped
        events.put(event)

    def run() -> None:
        try:
            work(emit)
            events.put(done)
        except _Stopped:
            pass
        except BaseException as e:  # handed to the reader, which raises it in its own thread
            events.put(e)

    threading.Thread(target=run, name="inpaint-steps", daemon=True).start()
    try:
        while (event := events.get()) is not done:
            if isinstance(event, BaseException):
                raise event
            yield event
    finally:
        gone.set()


def inpaint_steps(engine: Engine, face: np.ndarray, hole: np.ndarray, settings: DecodeSettings
                  ) -> Iterator[dict[str, Any]]:
    """One page request, as events (dicts with a "type"):
      start:  masked input [64, 64, 3], latent mask [S, 64, 64] before step 1, number of steps, notes;
      step:   its number (1..steps), the latent mask after it [S, 64, 64] and the image after it [S, 64, 64, 3],
              for each of the S samples;
      result: the inpainted images [S, 64, 64, 3] (known pixels are the input's), notes, seconds.
    An empty hole yields only a result (the input); an all-hole mask generates the whole face. The decode runs in a
    worker thread and each step is VQGAN-decoded and yielded as soon as the transformer has computed it."""
    if face.shape != (IMAGE_SIZE, IMAGE_SIZE, 3) or face.dtype != np.uint8:
        raise InputError(f"the face must be {IMAGE_SIZE}x{IMAGE_SIZE} RGB")
    if hole.shape != (IMAGE_SIZE, IMAGE_SIZE) or hole.dtype != bool:
        raise InputError(f"the mask must be {IMAGE_SIZE}x{IMAGE_SIZE} booleans")
    settings = settings.checked()
    start = time.perf_counter()
    if not hole.any():
        yield {"type": "result", "images": face[None], "seconds": 0.0,
               "notes": ["the mask has no hole: the input is returned unchanged"]}
        return
    notes = ["the whole image is a hole: a face is generated from nothing"] if hole.all() else []
    s, device, model = settings.samples, engine.device, engine.model
    masked = np.where(hole[..., None], np.uint8(HOLE_GRAY), face)
    images = normalize(uint8_to_tensor(masked), SPLIT)[None].repeat(s, 1, 1, 1).to(device)
    known = torch.from_numpy(~hole)[None, None].repeat(s, 1, 1, 1).to(device)
    known_tokens = latent_known_mask(known, model.latent_resolution)
    notes.append(f"hole: {hole.mean():.1%} of the pixels, {(~known_tokens[0]).float().mean():.1%} of the "
                 "16x16 tokens (a token is masked unless all its 16 pixels are known)")
    yield {"type": "start", "masked": masked, "mask": _latent_tile(known_tokens),
           "steps": settings.sweet_spot or settings.total_iter, "notes": notes}
    base = np.repeat(masked[None], s, axis=0)  # what inpaint pastes back: the masked input, exact in uint8

    def work(emit: Callable[[dict[str, Any]], None]) -> None:
        def show(t: int, tokens: torch.Tensor, still_masked: torch.Tensor) -> None:
            frame = tokens_to_uint8(model, tokens, base, known, SPLIT, settings.seam_blend)
            emit({"type": "step", "step": t + 1, "mask": _latent_tile(~still_masked), "images": frame})

        generator = torch.Generator(device).manual_seed(settings.seed)
        with engine.lock:
            result = inpaint(model, images, known, split=SPLIT, total_iter=settings.total_iter,
                             gamma_type=settings.schedule, sweet_spot=settings.sweet_spot,
                             temperature=settings.temperature, final_temperature=settings.final_temperature,
                             argmax=settings.decoding == "argmax",
                             ordering=settings.ordering, generator=generator, amp=engine.amp, on_step=show,
                             pixel_guidance=settings.pixel_guidance, seam_blend=settings.seam_blend)
        emit({"type": "result", "images": result.images, "notes": notes, "seconds": time.perf_counter() - start})

    yield from _from_worker(work)
