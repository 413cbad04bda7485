"""The GPU campaign (gpu_campaign.py): train a VQGAN and a transformer from the cat-face archive on a lent machine
in minutes, inpaint the val and test holes, and bring back everything worth scoring in a few small files.

A lent GPU starts bare, runs one command for at most 10 minutes and returns at most 8 files of 16 MiB, so:
- every phase runs on a wall-clock budget (Budget), never a step count: the same command fits any chip, and a
  slow phase cannot eat the next one's time;
- results.json is rewritten atomically after every phase (Results), and a phase that fails is recorded and does
  not stop the phases that do not need it: whatever the run reached comes back;
- the inpainted images come back as their hole pixels only (save_fill): the known pixels are the input's,
  pasted back exactly by the sampler, so the scorer rebuilds each image from the ground truth it holds;
- the weights come back as 16 MiB shards (utils.checkpoint.save_shards) when they fit beside the images, in fp16,
  and the images are decoded with exactly those fp16 weights, so the returned pair reproduces them.
The val holes are utils.masks.fixed_holes (the val study's strokes, and boxes); the test holes are the prepared
test set's (utils.cat_faces). Nothing here needs the FID network, which cannot travel: score_campaign.py scores
the returned folder on this side.
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import math
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from models.VQGAN import VQGAN, load_vqgan_config
from models.VQGAN_Transformer import MaskGit, decoding_choices, load_maskgit_config
from sampler.maskgit_sampler import inpaint
from training.train_masks import DEFAULT_HOLE_MASK_PROB, DEFAULT_TRAIN_MASKS
from training.transformer import TokenData, TransformerTrainer
from training.transformer import validate as token_validate
from training.vqgan import VQGANTrainer, images_to_device, random_hflip
from training.vqgan import validate as vqgan_validate
from utils.cat_faces import CatFaces, dataset_identity, list_images, split_dataset
from utils.checkpoint import atomic_save, atomic_write, load_shards, load_state_dict_strict, save_shards
from utils.cli import TrainingStopped
from utils.config import resolve_path
from utils.data import InpaintingTestSet
from utils.image import uint8_to_tensor
from utils.masks import fixed_holes
from utils.precision import conv_memory_format
from utils.train_utils import DistEnv, GracefulInterrupt, warmup_cosine

FORMAT = "maskgit-gpu-campaign/1"
RESULTS = "results.json"
WEIGHTS_PREFIX = "pair"  # pair-II-of-NN.pt: the VQGAN's tensors under "vqgan.", the transformer's under "transformer."
# what the device tool returns from $OUT (its README): at most 8 files of 16 MiB, 64 MiB together
RETURN_FILES, RETURN_FILE_BYTES, RETURN_TOTAL_BYTES = 8, 16 * 2 ** 20, 64 * 2 ** 20
RESULTS_RESERVE = 256 * 1024  # room kept for results.json when deciding whether the weights fit
HOLE_SETS = ("val_stroke", "val_box", "test")  # the inpainted sets, each one file SET.npz
# what the unbudgeted work after the stage-1 training takes at most on a GPU (tokenizing, validating, saving), kept
# free before a deadline
FIXED_WORK_MINUTES = 0.75


class Budget:
    """A phase's wall-clock allowance, started at construction; `stop` also ends it early (an interrupt)."""

    def __init__(self, minutes: float, stop: Callable[[], bool] = lambda: False) -> None:
        self.seconds, self.stop = 60.0 * minutes, stop
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over(self) -> bool:
        return self.elapsed() >= self.seconds or self.stop()


class BudgetSchedule:
    """LR multiplier for LambdaLR on a wall-clock budget: warm-up over `warmup_fraction` of the time, then cosine to
    0 at the budget's end. The clock starts after the first step, which torch.compile spends compiling: started
    with the budget, the warm-up would be over before the first weights moved."""

    def __init__(self, budget: Budget, warmup_fraction: float) -> None:
        self.budget, self.start = budget, 0.0
        self.schedule = warmup_cosine(round(1000 * warmup_fraction), 1000)  # in thousandths of the time

    def __call__(self, step: int) -> float:
        if step <= 1:  # LambdaLR asks before the first step (0) and after it (1)
            self.start = self.budget.elapsed()
        span = max(self.budget.seconds - self.start, 1e-9)
        return self.schedule(int(1000 * min(1.0, (self.budget.elapsed() - self.start) / span)))


class LossLog:
    """Mean losses over successive windows of a training phase (about `points` windows per budget), so that
    results.json holds a curve of a few dozen points whatever the number of steps. Each loss is averaged over the
    steps that report it (the GAN losses only exist once the GAN is on)."""

    def __init__(self, budget: Budget, points: int = 20) -> None:
        self.budget, self.window = budget, budget.seconds / points
        self.rows: list[dict[str, float]] = []
        self._sums: dict[str, list[float]] = {}
        self._next = self.window

    def add(self, step: int, losses: dict[str, float], **extra: float) -> None:
        for k, v in losses.items():
            total = self._sums.setdefault(k, [0.0, 0])
            total[0] += v
            total[1] += 1
        if self.budget.elapsed() >= self._next:
            self.flush(step, **extra)

    def flush(self, step: int, **extra: float) -> None:
        """Close the current window (also at the end of the phase, for the last partial one)."""
        if self._sums:
            self.rows.append({"step": step, "seconds": round(self.budget.elapsed(), 2), **extra,
                              **{k: total / n for k, (total, n) in self._sums.items()}})
        self._sums = {}
        self._next = self.budget.elapsed() + self.window


class Results:
    """results.json in `out`: the run's header and one record per phase, rewritten atomically after every phase.
    Once `stop()` (an interrupt), the phases not yet started are recorded as skipped."""

    def __init__(self, out: Path, header: dict[str, Any], stop: Callable[[], bool] = lambda: False) -> None:
        self.out, self.path, self.stop = out, out / RESULTS, stop
        self.data: dict[str, Any] = {"format": FORMAT, **header, "phases": {}, "outputs": {}}
        self.save()

    def ok(self, name: str) -> bool:
        return self.data["phases"].get(name, {}).get("status") == "ok"

    def run(self, name: str, fn: Callable[[dict[str, Any]], None], needs: Sequence[str] = ()) -> bool:
        """Run one phase: fn fills its record. A failure is recorded (and printed) and the campaign goes on, since
        the run cannot be repeated; a phase whose `needs` did not succeed is skipped. True when it succeeded."""
        record: dict[str, Any] = {"status": "running"}
        self.data["phases"][name] = record
        missing = [n for n in needs if not self.ok(n)]
        if missing or self.stop():
            record.update(status="skipped", reason=f"needs {', '.join(missing)}" if missing else "interrupted")
            self.save()
            return False
        self.save()  # a run killed now still says which phase it was in
        print(f"--- {name}", flush=True)
        start = time.perf_counter()
        try:
            fn(record)
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
        return record["status"] == "ok"

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


# ------------------------------------------------------------------------------------------------ returned files

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


def load_pair(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The (VQGAN, transformer) state_dicts of a campaign's returned weight shards, joined."""
    state = load_shards(folder, WEIGHTS_PREFIX)
    parts: dict[str, dict[str, torch.Tensor]] = {"vqgan": {}, "transformer": {}}
    for key, value in state.items():
        part, _, name = key.partition(".")
        parts[part][name] = value
    return parts["vqgan"], parts["transformer"]


def fp16_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state_dict in fp16 on the CPU (floating tensors only; integer buffers keep their dtype)."""
    return {k: (v.half() if v.is_floating_point() else v).detach().cpu().clone() for k, v in module.state_dict().items()}


@dataclass(frozen=True)
class Size:
    """A model pair and the recipe its campaign trains it with."""
    vqgan_config: str
    maskgit_config: str
    vqgan_batch: int
    vqgan_lr: float
    transformer_batch: int
    transformer_lr: float
    inpaint_batch: int


SIZES = {
    # the lab's fixed structures (70.8 M + 72.7 M parameters)
    "lab": Size("configs/VQGAN.yml", "configs/MaskGit.yml", 64, 2e-4, 128, 3e-4, 128),
    # the lab's layouts scaled down so that the fp16 pair (57.9 MB) comes back beside the images
    "mid": Size("configs/VQGAN_mid.yml", "configs/MaskGit_mid.yml", 64, 2e-4, 128, 5e-4, 128),
    # tiny, for --smoke on a CPU
    "smoke": Size("configs/VQGAN_smoke.yml", "configs/MaskGit_smoke.yml", 8, 1e-3, 16, 1e-3, 16),
}


@dataclass
class Settings:
    """Everything a campaign run needs, from the script's flags. minutes: the budget of 'vqgan', 'transformer' and
    'inpaint' (each hole set)."""
    size: str
    source: Path
    out: Path
    work: Path
    device: torch.device
    amp: str
    compile: bool
    minutes: dict[str, float]
    gan_warmup: float
    total_iter: int
    seed: int = 0
    test_size: int = 747
    val_fraction: float = 0.1
    first_files: int | None = None
    deadline: float | None = None  # time.time() by which every phase must be done
    decoding_config: str = "configs/MaskGit_demo.yml"


# the transformer recipe beyond the size's batch and learning rate: the MaskGIT paper's (docs/TRAINING.md "Stage 2: the transformer")
TRANSFORMER_RECIPE = {"betas": (0.9, 0.96), "weight_decay": 0.045, "label_smoothing": 0.1, "grad_clip": 1.0,
                      "ema_decay": 0.999, "warmup_fraction": 0.05}


class Campaign:
    """The phases in order, each filling its record of results.json through Results.run; an interrupt ends the
    current phase's budget (its work so far is kept) and skips the phases after it."""

    def __init__(self, s: Settings, results: Results, interrupt: GracefulInterrupt) -> None:
        self.s, self.results, self.interrupt = s, results, interrupt
        self.size = SIZES[s.size]
        self.data: CatFaces | None = None
        self.maskgit: MaskGit | None = None
        self.weights: dict[str, dict[str, torch.Tensor]] = {}
        self.tokens: dict[str, torch.Tensor] = {}
        self.hole_sets: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
        self.decoding = chosen_decoding(resolve_path(s.decoding_config), s.total_iter)
        results.data["decoding"] = self.decoding

    def stop(self) -> bool:
        return self.interrupt.requested

    def budget(self, phase: str, later: float) -> Budget:
        """The phase's budget, cut where needed so that the `later` minutes of the phases after it (and the fixed
        work between them) still fit before the deadline: a slow start costs training time, not the images."""
        minutes = self.s.minutes[phase]
        if self.s.deadline is not None:
            left = (self.s.deadline - time.time()) / 60 - later - FIXED_WORK_MINUTES
            minutes = max(0.0, min(minutes, left))
        return Budget(minutes, self.stop)

    def run(self) -> bool:
        """Every phase; True when all succeeded."""
        r = self.results
        ok = r.run("data", self.prepare_data)
        ok &= r.run("vqgan", self.train_vqgan, needs=["data"])
        ok &= r.run("tokenize", self.tokenize, needs=["vqgan"])
        ok &= r.run("transformer", self.train_transformer, needs=["tokenize"])
        ok &= r.run("weights", self.return_weights, needs=["transformer"])  # before inpainting: kept if that fails
        for name in HOLE_SETS:
            ok &= r.run(f"inpaint_{name}", functools.partial(self.inpaint, name), needs=["transformer"])
        return ok

    # ---------------------------------------------------------------------------------------------- phases

    def prepare_data(self, rec: dict[str, Any]) -> None:
        """The prepared dataset's splits and test holes, in memory (utils.cat_faces)."""
        s = self.s
        names = list_images(s.source)
        cut = s.first_files is not None and s.first_files < len(names)
        names = names[:s.first_files] if cut else names
        start = time.perf_counter()
        identity = dataset_identity(s.source, names, s.seed, s.test_size, s.val_fraction, len(names) if cut else None)
        self.data = split_dataset(s.source, names, s.seed, s.test_size, s.val_fraction)
        self.hole_sets = {name: hole_set(self.data, name) for name in HOLE_SETS}  # drawn once: 781 strokes take 9 s
        rec.update(identity=identity, counts=self.data.counts,
                   images_per_s=len(names) / max(time.perf_counter() - start, 1e-9))

    def train_vqgan(self, rec: dict[str, Any]) -> None:
        """Reconstruction (+ codebook) loss, the GAN loss from `gan_warmup` of the budget on; then val PSNR, codebook
        usage and perplexity of the fp16 weights that are returned and used from here on."""
        s, size, data = self.s, self.size, self.data
        cfg = load_vqgan_config(resolve_path(size.vqgan_config))
        trainer = VQGANTrainer(cfg, {"batch_size": size.vqgan_batch, "learning_rate": size.vqgan_lr,
                                     "disc_start": sys.maxsize}, s.device, s.amp)
        train = images_to_device(data.train, "train", s.device)
        bs = min(size.vqgan_batch, len(train))
        trainer.init_codebook(train[torch.randperm(len(train), device=s.device)[:64]])
        budget = self.budget("vqgan", later=s.minutes["transformer"] + len(HOLE_SETS) * s.minutes["inpaint"])
        rec["budget_minutes"] = budget.seconds / 60
        log, order, pos = LossLog(budget), torch.empty(0, dtype=torch.long), len(train)
        rec.update(params=sum(p.numel() for p in trainer.model.parameters()), batch_size=bs, gan_start=None)
        while not budget.over():
            if rec["gan_start"] is None and budget.elapsed() >= s.gan_warmup * budget.seconds:
                trainer.start_gan()
                rec["gan_start"] = {"step": trainer.step, "seconds": round(budget.elapsed(), 2)}
            if pos + bs > len(train):  # a new epoch: a fresh order
                order, pos = torch.randperm(len(train), device=s.device), 0
            try:
                losses = trainer.train_step(random_hflip(train[order[pos:pos + bs]]))
            except FloatingPointError as e:
                rec["stopped"] = f"{e} at step {trainer.step + 1}; the weights before that step are kept"
                break
            pos += bs
            log.add(trainer.step, losses)
        seconds = budget.elapsed()
        log.flush(trainer.step)
        rec.update(steps=trainer.step, train_seconds=round(seconds, 2), images_per_s=trainer.step * bs / seconds,
                   epochs=trainer.step * bs / len(train), losses=log.rows)
        self.weights["vqgan"] = fp16_weights(trainer.model)
        del trainer, train
        model = VQGAN(cfg)
        load_state_dict_strict(model, self.weights["vqgan"], source="the trained VQGAN")
        model = model.to(s.device, memory_format=conv_memory_format(s.device))
        val = images_to_device(data.val, "val", s.device)
        rec.update(vqgan_validate(model, val, size.inpaint_batch, s.amp))
        atomic_save(self.weights["vqgan"], s.work / "VQGAN.pt")

    def tokenize(self, rec: dict[str, Any]) -> None:
        """Token ids of train, its mirror images and val, by the trained VQGAN in fp32, as the sampler encodes."""
        s, size = self.s, self.size
        cfg = load_maskgit_config(resolve_path(size.maskgit_config))
        cfg["VQ_Configs"] = {"VQ_config_path": str(resolve_path(size.vqgan_config)),
                             "VQ_CKPT_path": str(s.work / "VQGAN.pt")}
        self.maskgit = MaskGit(cfg).to(s.device).eval()
        start = time.perf_counter()
        for name, images, split in (("train", self.data.train, "train"),
                                    ("train_flip", self.data.train[:, :, ::-1], "train"),
                                    ("val", self.data.val, "val")):
            self.tokens[name] = tokenize_images(self.maskgit, images, split, size.inpaint_batch)
        count = sum(len(t) for t in self.tokens.values())
        used = torch.unique(torch.cat(list(self.tokens.values())))
        rec.update(images=count, images_per_s=count / (time.perf_counter() - start),
                   codes_used=len(used) / self.maskgit.vqgan.num_codebook_vectors)

    def train_transformer(self, rec: dict[str, Any]) -> None:
        """MVTM on train + mirror images (training.transformer's steps) with a warm-up and cosine schedule over the
        budget's wall time; then val loss and masked-token accuracy (the fixed val masks of training_transformer.py)
        of the fp16 EMA weights that are returned and decode from here on."""
        s, size, maskgit = self.s, self.size, self.maskgit
        data = TokenData.from_tokens(self.tokens["train"], self.tokens["train_flip"], self.tokens["val"], maskgit,
                                     partial=1.0, seed=s.seed, device=s.device)
        bs = min(size.transformer_batch, len(data.train))
        r = TRANSFORMER_RECIPE
        args = argparse.Namespace(batch_size=bs, accum_grad=1, epochs=1, start_from_epoch=0, partial=1.0,
                                  learning_rate=size.transformer_lr, betas=r["betas"], weight_decay=r["weight_decay"],
                                  warmup_steps=0, label_smoothing=r["label_smoothing"], grad_clip=r["grad_clip"],
                                  ema_decay=r["ema_decay"], amp=s.amp, compile=s.compile, seed=s.seed, max_steps=0,
                                  ckpt_interval=0, save_per_epoch=1, train_masks=DEFAULT_TRAIN_MASKS,
                                  hole_mask_prob=DEFAULT_HOLE_MASK_PROB, schedule="cosine", cooldown_steps=0,
                                  max_minutes=0)
        env = DistEnv(0, 1, s.device)
        budget = self.budget("transformer", later=len(HOLE_SETS) * s.minutes["inpaint"])
        log = LossLog(budget)
        rec.update(params=sum(p.numel() for p in maskgit.transformer.parameters()), batch_size=bs,
                   compile=s.compile, amp=s.amp, recipe={**r, "learning_rate": size.transformer_lr},
                   budget_minutes=budget.seconds / 60)
        for compiled in [True, False] if s.compile else [False]:
            args.compile = compiled
            trainer = TransformerTrainer(maskgit, data, args, {"campaign": s.size}, env, s.work,
                                         lr_factor=BudgetSchedule(budget, r["warmup_fraction"]))
            try:
                for loss in trainer.steps_until(budget.over, self.interrupt):
                    step = trainer.progress.step
                    if step == 1:
                        rec["first_step_seconds"] = round(budget.elapsed(), 2)  # with torch.compile's compilation
                    log.add(step, {"loss": loss}, lr=trainer.scheduler.get_last_lr()[0])
                break
            except TrainingStopped as e:  # a non-finite loss, raised before that step changed any weight
                rec["stopped"] = f"{e}; the weights before that step are kept"
                break
            except Exception as e:  # noqa: BLE001 - a compiler that fails on this machine must not cost the run
                if not compiled or trainer.progress.step > 0:
                    raise
                traceback.print_exc()
                rec.update(compile=False, compile_error=f"{type(e).__name__}: {e}"[:1000])
        seconds = budget.elapsed()
        log.flush(trainer.progress.step)
        steps = trainer.progress.step
        rec.update(steps=steps, train_seconds=round(seconds, 2), images_per_s=steps * bs / seconds,
                   epochs=steps * bs / len(data.train), losses=log.rows)
        self.weights["transformer"] = fp16_weights(trainer.ema.module)
        load_state_dict_strict(maskgit.transformer, self.weights["transformer"], source="the trained transformer")
        del trainer
        maskgit.eval()
        val_loss, val_acc = token_validate(maskgit.transformer, data, bs, env, s.amp)
        rec.update(val_loss=val_loss, val_token_accuracy=val_acc)

    def return_weights(self, rec: dict[str, Any]) -> None:
        """The fp16 pair as shards into --out, when they fit the device's return limits beside the images."""
        state = {f"{part}.{k}": v for part in ("vqgan", "transformer") for k, v in self.weights[part].items()}
        nbytes = sum(v.nbytes for v in state.values())
        images = sum(fill_bytes_bound(holes) for _, holes, _ in self.hole_sets.values())
        files_left = RETURN_FILES - 1 - len(HOLE_SETS)
        rec.update(bytes=nbytes, configs={"vqgan": self.size.vqgan_config, "maskgit": self.size.maskgit_config})
        if nbytes + images + RESULTS_RESERVE > RETURN_TOTAL_BYTES or nbytes > files_left * RETURN_FILE_BYTES * 0.99:
            rec.update(returned=False, reason=f"{nbytes / 1e6:.1f} MB of fp16 weights do not fit beside "
                                              f"{images / 1e6:.1f} MB of images in the {RETURN_FILES} files of "
                                              f"{RETURN_FILE_BYTES >> 20} MiB ({RETURN_TOTAL_BYTES >> 20} MiB in all) "
                                              "that come back")
            return
        paths = save_shards(state, self.s.out, WEIGHTS_PREFIX, RETURN_FILE_BYTES)
        if len(paths) > files_left:
            for path in paths:
                path.unlink()
            raise RuntimeError(f"the weights took {len(paths)} shards, more than the {files_left} files left")
        rec.update(returned=True, files=[p.name for p in paths])

    def inpaint(self, name: str, rec: dict[str, Any]) -> None:
        """Inpaint one hole set until done or out of budget; the images done go to NAME.npz (save_fill)."""
        images, holes, split = self.hole_sets[name]
        budget = self.budget("inpaint", later=(len(HOLE_SETS) - 1 - HOLE_SETS.index(name)) * self.s.minutes["inpaint"])
        rec["budget_minutes"] = budget.seconds / 60
        filled = inpaint_images(self.maskgit, images, holes, split, self.decoding, self.size.inpaint_batch,
                                self.s.seed, self.s.amp, budget)
        if not np.array_equal(filled[~holes[:len(filled)]], images[:len(filled)][~holes[:len(filled)]]):
            raise RuntimeError("the known pixels were not pasted back exactly; the hole pixels alone would not "
                               "rebuild these images")
        save_fill(self.s.out / f"{name}.npz", filled, holes[:len(filled)])
        rec.update(images=len(filled), of=len(images), images_per_s=len(filled) / budget.elapsed(),
                   hole_fraction=float(holes[:len(filled)].mean()) if len(filled) else None, file=f"{name}.npz")


def chosen_decoding(config_path: str | Path, total_iter: int) -> dict[str, Any]:
    """The decoding chosen on val (a config's decoding keys, schedule and choice temperature) with T steps."""
    cfg = load_maskgit_config(config_path)
    return {**decoding_choices(cfg, config_path), "gamma_type": cfg["gamma_type"],
            "choice_temperature": cfg["choice_temperature"], "total_iter": total_iter}


def hole_set(data: CatFaces, name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(clean images, holes, normalization split) of one of HOLE_SETS: the val images with their fixed stroke or
    box holes, or the test images with the prepared test set's holes."""
    if name == "test":
        return data.test, data.test_holes, "test"
    return data.val, fixed_holes(name.removeprefix("val_"), len(data.val)), "val"


def tokenize_images(maskgit: MaskGit, images: np.ndarray, split: str, batch_size: int) -> torch.Tensor:
    """Token ids [N, tokens] of uint8 images [N,H,W,3], on the model's device (its VQGAN in fp32)."""
    device = next(maskgit.parameters()).device
    return torch.cat([maskgit.tokenize(uint8_to_tensor(np.ascontiguousarray(images[i:i + batch_size])).to(device),
                                       split) for i in range(0, len(images), batch_size)])


def inpaint_images(maskgit: MaskGit, images: np.ndarray, holes: np.ndarray, split: str, decoding: dict[str, Any],
                   batch_size: int, seed: int, amp: str, budget: Budget) -> np.ndarray:
    """uint8 images [N,H,W,3] with `holes` painted gray, inpainted batch after batch with `decoding` (the keys of
    Campaign.decoding) until done or out of budget -> the uint8 images done [M<=N,H,W,3], in order."""
    device = next(maskgit.parameters()).device
    dataset = InpaintingTestSet.with_holes(images, [str(i) for i in range(len(images))], holes, split)
    generator = torch.Generator(device).manual_seed(seed)
    done: list[np.ndarray] = []
    for x, known, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        if budget.over():
            break
        done.append(inpaint(maskgit, x.to(device), known.to(device), split=split, total_iter=decoding["total_iter"],
                            gamma_type=decoding["gamma_type"], choice_temperature=decoding["choice_temperature"],
                            argmax=decoding["decoding"] == "argmax", pixel_guidance=decoding["pixel_guidance"],
                            seam_blend=decoding["seam_blend"], ordering=decoding["ordering"],
                            temperature=decoding["temperature"], final_temperature=decoding["final_temperature"],
                            generator=generator, amp=amp).images)
    return np.concatenate(done) if done else np.zeros((0, *images.shape[1:]), np.uint8)
