"""The GPU campaign (gpu_campaign.py): train a VQGAN and a transformer from the cat-face archive on a lent machine
in minutes, inpaint the val and test holes, and bring back everything worth scoring in a few small files.

run_campaign tells it in order, one phase after the other, each with its record in results.json:
  data         the archive split in memory (utils.cat_faces) and the holes to inpaint drawn;
  vqgan        the VQGAN trained, then validated in the fp16 weights that are returned and used from then on;
  tokenize     train, its mirror images and val turned into token ids by that VQGAN;
  transformer  the transformer trained on those tokens, then validated in its fp16 EMA weights;
  weights      the fp16 pair written into --out, when it fits beside the images;
  inpaint_*    each hole set inpainted with the decoding chosen on val, its hole pixels written into SET.npz.
A lent GPU starts bare and runs one command for at most 10 minutes, so every training and inpainting phase runs on
a wall-clock budget (training/time_budget.py), cut to fit a deadline when one is set; a phase that fails is
recorded, and only the phases that need it are skipped: whatever the run reached comes back, in the files of
training/campaign_files.py. The images are decoded with exactly the fp16 weights that come back, so the returned
pair reproduces them. Nothing here needs the FID network, which cannot travel: score_campaign.py scores the
returned folder on this side.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from models.VQGAN import VQGAN, load_vqgan_config
from models.VQGAN_Transformer import MaskGit, decoding_choices, load_maskgit_config
from sampler.maskgit_sampler import inpaint
from training.campaign_files import (HOLE_SETS, RESULTS_RESERVE, RETURN_FILE_BYTES, RETURN_FILES, RETURN_TOTAL_BYTES,
                                     WEIGHTS_PREFIX, Results, fill_bytes_bound, hole_set, pair_state, save_fill)
from training.time_budget import Budget, BudgetSchedule, LossLog
from training.augment import DEFAULT_AUGMENT
from training.train_masks import DEFAULT_HOLE_MASK_PROB, DEFAULT_TRAIN_MASKS
from training.transformer import TokenData, TransformerTrainer
from training.transformer import validate as token_validate
from training.vqgan import VQGANTrainer, images_to_device, random_hflip
from training.vqgan import validate as vqgan_validate
from utils.cat_faces import CatFaces, dataset_identity, list_images, split_dataset
from utils.checkpoint import atomic_save, half_state, load_state_dict_strict, save_shards
from utils.cli import TrainingStopped
from utils.config import resolve_path
from utils.data import InpaintingTestSet
from utils.image import uint8_to_tensor
from utils.precision import conv_memory_format
from utils.train_utils import DistEnv, GracefulInterrupt

# what the unbudgeted work after the stage-1 training takes at most on a GPU (tokenizing, validating, saving), kept
# free before a deadline
FIXED_WORK_MINUTES = 0.75
# the transformer recipe beyond the size's batch and learning rate: the MaskGIT paper's (docs/TRAINING.md "Stage 2:
# the transformer")
TRANSFORMER_RECIPE = {"betas": (0.9, 0.96), "weight_decay": 0.045, "label_smoothing": 0.1, "grad_clip": 1.0,
                      "ema_decay": 0.999, "warmup_fraction": 0.05}


@dataclass(frozen=True)
class Recipe:
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
    "lab": Recipe("configs/VQGAN.yml", "configs/MaskGit.yml", 64, 2e-4, 128, 3e-4, 128),
    # the lab's layouts scaled down so that the fp16 pair (57.9 MB) comes back beside the images
    "mid": Recipe("configs/VQGAN_mid.yml", "configs/MaskGit_mid.yml", 64, 2e-4, 128, 5e-4, 128),
    # tiny, for --smoke on a CPU
    "smoke": Recipe("configs/VQGAN_smoke.yml", "configs/MaskGit_smoke.yml", 8, 1e-3, 16, 1e-3, 16),
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

    @property
    def recipe(self) -> Recipe:
        return SIZES[self.size]

    @property
    def vqgan_checkpoint(self) -> Path:
        """Where the vqgan phase leaves the trained VQGAN (fp16) for the tokenize phase to build the MaskGit on."""
        return self.work / "VQGAN.pt"


@dataclass
class FacesAndHoles:
    """The data phase's product: the dataset split in memory and each hole set's (clean images, holes, split)."""
    faces: CatFaces
    hole_sets: dict[str, tuple[np.ndarray, np.ndarray, str]]


@dataclass
class Tokenized:
    """The tokenize phase's product: the token ids of train, its mirror images and val, and the MaskGit built on the
    trained VQGAN, whose transformer the transformer phase trains and leaves holding the returned fp16 weights,
    which the inpainting decodes with; for a transformer with pixel conditioning also the uint8 train and val
    images, which it trains on."""
    maskgit: MaskGit
    tokens: dict[str, torch.Tensor]
    images: tuple[np.ndarray, np.ndarray] | None = None


def run_campaign(s: Settings, results: Results, interrupt: GracefulInterrupt) -> bool:
    """The whole campaign, phase after phase; True when every phase succeeded. Each phase fills its record of
    results.json and hands its product to the phases that need it (Results.run); an interrupt ends the current
    phase's budget (its work so far is kept) and skips the phases after it."""
    decoding = chosen_decoding(resolve_path(s.decoding_config), s.total_iter)
    results.data["decoding"] = decoding

    data = results.run("data", load_data, s)
    vqgan_weights = results.run("vqgan", train_vqgan, s, data, interrupt, needs=["data"])
    tokenized = results.run("tokenize", tokenize, s, data, needs=["vqgan"])
    transformer_weights = results.run("transformer", train_transformer, s, tokenized, interrupt, needs=["tokenize"])
    # before the inpainting, so that the weights come back even if that fails
    results.run("weights", return_weights, s, data, vqgan_weights, transformer_weights, needs=["transformer"])
    for name in HOLE_SETS:
        results.run(f"inpaint_{name}", inpaint_hole_set, s, data, name, tokenized, decoding, interrupt,
                    needs=["transformer"])
    return results.all_ok()


def load_data(rec: dict[str, Any], s: Settings) -> FacesAndHoles:
    """The prepared dataset's splits and test holes, in memory (utils.cat_faces), and the holes to inpaint."""
    names = list_images(s.source)
    cut = s.first_files is not None and s.first_files < len(names)
    names = names[:s.first_files] if cut else names
    start = time.perf_counter()
    identity = dataset_identity(s.source, names, s.seed, s.test_size, s.val_fraction, len(names) if cut else None)
    faces = split_dataset(s.source, names, s.seed, s.test_size, s.val_fraction)
    hole_sets = {name: hole_set(faces, name) for name in HOLE_SETS}  # drawn once: 781 strokes take 9 s
    rec.update(identity=identity, counts=faces.counts,
               images_per_s=len(names) / max(time.perf_counter() - start, 1e-9))
    return FacesAndHoles(faces, hole_sets)


def train_vqgan(rec: dict[str, Any], s: Settings, data: FacesAndHoles, interrupt: GracefulInterrupt
                ) -> dict[str, torch.Tensor]:
    """Reconstruction (+ codebook) loss, the GAN loss from `gan_warmup` of the budget on; then val PSNR, codebook
    usage and perplexity of the fp16 weights that are returned and used from here on."""
    recipe = s.recipe
    cfg = load_vqgan_config(resolve_path(recipe.vqgan_config))
    trainer = VQGANTrainer(cfg, {"batch_size": recipe.vqgan_batch, "learning_rate": recipe.vqgan_lr,
                                 "disc_start": sys.maxsize}, s.device, s.amp)
    train = images_to_device(data.faces.train, "train", s.device)
    bs = min(recipe.vqgan_batch, len(train))
    trainer.init_codebook(train[torch.randperm(len(train), device=s.device)[:64]])
    budget = phase_budget(s, "vqgan", interrupt,
                          later=s.minutes["transformer"] + len(HOLE_SETS) * s.minutes["inpaint"])
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
    weights = half_state(trainer.model.state_dict())
    del trainer, train
    model = VQGAN(cfg)
    load_state_dict_strict(model, weights, source="the trained VQGAN")
    model = model.to(s.device, memory_format=conv_memory_format(s.device))
    val = images_to_device(data.faces.val, "val", s.device)
    rec.update(vqgan_validate(model, val, recipe.inpaint_batch, s.amp))
    atomic_save(weights, s.vqgan_checkpoint)
    return weights


def tokenize(rec: dict[str, Any], s: Settings, data: FacesAndHoles) -> Tokenized:
    """Token ids of train, its mirror images and val, by the trained VQGAN in fp32, as the sampler encodes."""
    recipe = s.recipe
    cfg = load_maskgit_config(resolve_path(recipe.maskgit_config))
    cfg["VQ_Configs"] = {"VQ_config_path": str(resolve_path(recipe.vqgan_config)),
                         "VQ_CKPT_path": str(s.vqgan_checkpoint)}
    maskgit = MaskGit(cfg).to(s.device).eval()
    start = time.perf_counter()
    faces = data.faces
    tokens = {name: tokenize_images(maskgit, images, split, recipe.inpaint_batch)
              for name, images, split in (("train", faces.train, "train"),
                                          ("train_flip", faces.train[:, :, ::-1], "train"),
                                          ("val", faces.val, "val"))}
    count = sum(len(t) for t in tokens.values())
    used = torch.unique(torch.cat(list(tokens.values())))
    rec.update(images=count, images_per_s=count / (time.perf_counter() - start),
               codes_used=len(used) / maskgit.vqgan.num_codebook_vectors)
    images = (faces.train, faces.val) if maskgit.transformer.pixel_conditioning else None
    return Tokenized(maskgit, tokens, images)


def train_transformer(rec: dict[str, Any], s: Settings, tokenized: Tokenized, interrupt: GracefulInterrupt
                      ) -> dict[str, torch.Tensor]:
    """MVTM on train + mirror images (training.transformer's steps) with a warm-up and cosine schedule over the
    budget's wall time; then val loss and masked-token accuracy (the fixed val masks of training_transformer.py)
    of the fp16 EMA weights that are returned and decode from here on."""
    maskgit, tokens, recipe = tokenized.maskgit, tokenized.tokens, s.recipe
    data = TokenData.from_tokens(tokens["train"], tokens["train_flip"], tokens["val"], maskgit, partial=1.0,
                                 seed=s.seed, device=s.device, images=tokenized.images)
    bs = min(recipe.transformer_batch, len(data.train))
    args = transformer_flags(s, bs)
    env = DistEnv(0, 1, s.device)
    budget = phase_budget(s, "transformer", interrupt, later=len(HOLE_SETS) * s.minutes["inpaint"])
    log = LossLog(budget)
    rec.update(params=sum(p.numel() for p in maskgit.transformer.parameters()), batch_size=bs,
               compile=s.compile, amp=s.amp, recipe={**TRANSFORMER_RECIPE, "learning_rate": recipe.transformer_lr},
               budget_minutes=budget.seconds / 60)
    for compiled in [True, False] if s.compile else [False]:
        args.compile = compiled
        trainer = TransformerTrainer(maskgit, data, args, {"campaign": s.size}, env, s.work,
                                     lr_factor=BudgetSchedule(budget, TRANSFORMER_RECIPE["warmup_fraction"]))
        try:
            for loss in trainer.steps_until(budget.over, interrupt):
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
    weights = half_state(trainer.ema.module.state_dict())
    load_state_dict_strict(maskgit.transformer, weights, source="the trained transformer")
    del trainer
    maskgit.eval()
    val_loss, val_acc = token_validate(maskgit.transformer, data, bs, env, s.amp)
    rec.update(val_loss=val_loss, val_token_accuracy=val_acc)
    return weights


def return_weights(rec: dict[str, Any], s: Settings, data: FacesAndHoles, vqgan_weights: dict[str, torch.Tensor],
                   transformer_weights: dict[str, torch.Tensor]) -> None:
    """The fp16 pair as shards into --out, when they fit the device's return limits beside the images."""
    state = pair_state(vqgan_weights, transformer_weights)
    nbytes = sum(v.nbytes for v in state.values())
    images = sum(fill_bytes_bound(holes) for _, holes, _ in data.hole_sets.values())
    files_left = RETURN_FILES - 1 - len(HOLE_SETS)
    rec.update(bytes=nbytes, configs={"vqgan": s.recipe.vqgan_config, "maskgit": s.recipe.maskgit_config})
    if nbytes + images + RESULTS_RESERVE > RETURN_TOTAL_BYTES or nbytes > files_left * RETURN_FILE_BYTES * 0.99:
        rec.update(returned=False, reason=f"{nbytes / 1e6:.1f} MB of fp16 weights do not fit beside "
                                          f"{images / 1e6:.1f} MB of images in the {RETURN_FILES} files of "
                                          f"{RETURN_FILE_BYTES >> 20} MiB ({RETURN_TOTAL_BYTES >> 20} MiB in all) "
                                          "that come back")
        return
    paths = save_shards(state, s.out, WEIGHTS_PREFIX, RETURN_FILE_BYTES)
    if len(paths) > files_left:
        for path in paths:
            path.unlink()
        raise RuntimeError(f"the weights took {len(paths)} shards, more than the {files_left} files left")
    rec.update(returned=True, files=[p.name for p in paths])


def inpaint_hole_set(rec: dict[str, Any], s: Settings, data: FacesAndHoles, name: str, tokenized: Tokenized,
                     decoding: dict[str, Any], interrupt: GracefulInterrupt) -> None:
    """Inpaint one hole set until done or out of budget; the images done go to NAME.npz (save_fill)."""
    images, holes, split = data.hole_sets[name]
    sets_after = len(HOLE_SETS) - 1 - HOLE_SETS.index(name)
    budget = phase_budget(s, "inpaint", interrupt, later=sets_after * s.minutes["inpaint"])
    rec["budget_minutes"] = budget.seconds / 60
    filled = inpaint_images(tokenized.maskgit, images, holes, split, decoding, s.recipe.inpaint_batch, s.seed,
                            s.amp, budget)
    holes_done = holes[:len(filled)]
    if not np.array_equal(filled[~holes_done], images[:len(filled)][~holes_done]):
        raise RuntimeError("the known pixels were not pasted back exactly; the hole pixels alone would not "
                           "rebuild these images")
    save_fill(s.out / f"{name}.npz", filled, holes_done)
    rec.update(images=len(filled), of=len(images), images_per_s=len(filled) / budget.elapsed(),
               hole_fraction=float(holes_done.mean()) if len(filled) else None, file=f"{name}.npz")


def phase_budget(s: Settings, phase: str, interrupt: GracefulInterrupt, later: float) -> Budget:
    """The phase's budget, started now and cut where needed so that the `later` minutes of the phases after it (and
    the fixed work between them) still fit before the deadline: a slow start costs training time, not the images.
    An interrupt ends it."""
    minutes = s.minutes[phase]
    if s.deadline is not None:
        left = (s.deadline - time.time()) / 60 - later - FIXED_WORK_MINUTES
        minutes = max(0.0, min(minutes, left))
    return Budget(minutes, lambda: interrupt.requested)


def transformer_flags(s: Settings, batch_size: int) -> argparse.Namespace:
    """training_transformer.py's flags for TransformerTrainer as the campaign drives it: the size's batch and
    learning rate, TRANSFORMER_RECIPE, no checkpoints and no step schedule (the budget paces the learning rate)."""
    r = TRANSFORMER_RECIPE
    return argparse.Namespace(batch_size=batch_size, accum_grad=1, epochs=1, start_from_epoch=0, partial=1.0,
                              learning_rate=s.recipe.transformer_lr, betas=r["betas"], weight_decay=r["weight_decay"],
                              warmup_steps=0, label_smoothing=r["label_smoothing"], grad_clip=r["grad_clip"],
                              ema_decay=r["ema_decay"], amp=s.amp, compile=s.compile, seed=s.seed, max_steps=0,
                              ckpt_interval=0, save_per_epoch=1, train_masks=DEFAULT_TRAIN_MASKS,
                              hole_mask_prob=DEFAULT_HOLE_MASK_PROB, schedule="cosine", cooldown_steps=0,
                              max_minutes=0, augment=DEFAULT_AUGMENT)


def chosen_decoding(config_path: str | Path, total_iter: int) -> dict[str, Any]:
    """The decoding chosen on val (a config's decoding keys, schedule and choice temperature) with T steps."""
    cfg = load_maskgit_config(config_path)
    return {**decoding_choices(cfg, config_path), "gamma_type": cfg["gamma_type"],
            "choice_temperature": cfg["choice_temperature"], "total_iter": total_iter}


def tokenize_images(maskgit: MaskGit, images: np.ndarray, split: str, batch_size: int) -> torch.Tensor:
    """Token ids [N, tokens] of uint8 images [N,H,W,3], on the model's device (its VQGAN in fp32)."""
    device = next(maskgit.parameters()).device
    return torch.cat([maskgit.tokenize(uint8_to_tensor(np.ascontiguousarray(images[i:i + batch_size])).to(device),
                                       split) for i in range(0, len(images), batch_size)])


def inpaint_images(maskgit: MaskGit, images: np.ndarray, holes: np.ndarray, split: str, decoding: dict[str, Any],
                   batch_size: int, seed: int, amp: str, budget: Budget) -> np.ndarray:
    """uint8 images [N,H,W,3] with `holes` painted gray, inpainted batch after batch with `decoding` (the keys of
    chosen_decoding) until done or out of budget -> the uint8 images done [M<=N,H,W,3], in order."""
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
