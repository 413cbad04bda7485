"""Stage 2 of MaskGIT: train the bidirectional transformer by masked visual token modeling (MVTM).

The frozen VQGAN tokenizes the train/val images once (utils/token_cache.py: cached, rebuilt only when the images
or the VQGAN weights change); training then only sees token ids. Each step masks ceil(gamma(r)*N) tokens per
image (r ~ U(0,1)) and minimizes the cross-entropy on the masked positions.

    python training_transformer.py --MaskGitConfig configs/MaskGit_small.yml --epochs 50
    python training_transformer.py --MaskGitConfig configs/MaskGit_small.yml --epochs 50 --resume
    python training_transformer.py --device cuda --batch-size 128 --compile --epochs 300     # the lab's model
    torchrun --standalone --nproc_per_node 4 training_transformer.py --device cuda --batch-size 64 --compile
    python training_transformer.py --MaskGitConfig ... --cache-only     # only tokenize (e.g. on a GPU machine)

Outputs in --checkpoint-path: transformer_epoch_N.pt and transformer_last.pt (EMA weights, plain state_dicts as
the lab's inpainting loads them), transformer_raw_last.pt (raw weights), training_state.pt (everything --resume
needs), log.csv, a copy of the config, token_cache.pt (unless --token-cache points elsewhere).
Exit codes: 0 done (or --max-steps reached), 1 non-finite loss or weights (nothing saved after it), 2 user error
(one line; --debug for a traceback), 130 interrupted (Ctrl-C/SIGTERM) after saving a state that --resume continues.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from models.Transformer import BidirectionalTransformer
from models.VQGAN_Transformer import MaskGit, load_maskgit_config, mask_tokens, masked_correct, mvtm_loss, resolve_path
from utils.checkpoint import (TRAINING_STATE_TAG, atomic_save, ensure_writable_dir, load_state_dict_strict,
                              load_training_state, load_weights, rng_state, set_rng_state)
from utils.token_cache import ensure_token_cache, load_token_cache
from utils.train_utils import (EMA, EXIT_INTERRUPTED, CSVLog, DistEnv, GracefulInterrupt, TrainingStopped,
                               UserError, all_gather_object, all_reduce_sum, atomic_write_text, autocast,
                               check_finite_weights, cleanup_distributed, diverged, on_main_then_share, run_cli,
                               seed_everything, setup_distributed, warmup_cosine)

LOG_FIELDS = ["epoch", "step", "train_loss", "val_loss", "val_acc", "lr", "seconds"]
# flags that shape the sequence of batches; --resume refuses to continue a run with different values
RUN_SHAPE_FLAGS = ["batch_size", "accum_grad", "partial", "seed", "start_from_epoch"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="MaskGIT stage 2: train the bidirectional transformer (MVTM).")
    # the lab's flags
    p.add_argument("--train_d_path", default="./cat_face/train/", help="folder of training images")
    p.add_argument("--val_d_path", default="./cat_face/val/", help="folder of validation images")
    p.add_argument("--checkpoint-path", default="./transformer_checkpoints", help="folder for weights, state, log")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (under torchrun each rank takes cuda:LOCAL_RANK)")
    p.add_argument("--num_workers", type=int, default=4, help="image loading workers while building the token cache")
    p.add_argument("--batch-size", type=int, default=32, help="images per micro-batch per process")
    p.add_argument("--partial", type=float, default=1.0, help="fraction of the training images used (fixed subset)")
    p.add_argument("--accum-grad", type=int, default=1, help="micro-batches accumulated per optimizer step")
    p.add_argument("--epochs", type=int, default=100, help="total epochs; the LR schedule spans them")
    p.add_argument("--save-per-epoch", type=int, default=1, help="write transformer_epoch_N.pt every N epochs")
    p.add_argument("--start-from-epoch", type=int, default=0,
                   help="load transformer_epoch_N.pt and train epochs N+1..--epochs (new optimizer and schedule; "
                        "--resume continues exactly instead, also a run that was started this way)")
    p.add_argument("--ckpt-interval", type=int, default=0,
                   help="also write training_state.pt every N optimizer steps (0: at the end of every epoch only)")
    p.add_argument("--learning-rate", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--MaskGitConfig", default="configs/MaskGit.yml", help="MaskGit YAML config")
    # beyond the lab
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue exactly from training_state.pt in --checkpoint-path")
    p.add_argument("--weight-decay", type=float, default=0.045)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.96))
    p.add_argument("--warmup-steps", type=int, default=1000, help="linear warm-up steps, then cosine decay to 0")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: off)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights, used for validation and saved")
    p.add_argument("--amp", choices=["bf16", "none"], default="bf16", help="bf16 autocast (CPU and CUDA) or fp32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (about 1.9x faster steps on an H100; slow first step)")
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop after this many optimizer steps in total, saving a state (0: no limit); the LR "
                        "schedule still spans --epochs, so a later --resume continues it exactly")
    p.add_argument("--token-cache", default=None, help="token cache file (default: CHECKPOINT_PATH/token_cache.pt)")
    p.add_argument("--cache-precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="VQGAN encoder precision for the cache; auto = bf16 if it matches fp32 on >= 99.9%% of tokens")
    p.add_argument("--cache-only", action="store_true",
                   help="build (or verify) the token cache and exit, e.g. on a GPU machine before training elsewhere")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--detect-anomaly", action="store_true", help="torch.autograd anomaly detection (slow)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    positive = {"--batch-size": args.batch_size, "--accum-grad": args.accum_grad, "--epochs": args.epochs,
                "--save-per-epoch": args.save_per_epoch, "--learning-rate": args.learning_rate}
    for flag, value in positive.items():
        if value <= 0:
            raise UserError(f"{flag} must be positive, got {value}")
    if not 0.0 < args.partial <= 1.0:
        raise UserError(f"--partial must be in (0, 1], got {args.partial}")
    if not 0 <= args.start_from_epoch < args.epochs:
        raise UserError(f"--start-from-epoch {args.start_from_epoch} must be below --epochs {args.epochs}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise UserError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if min(args.warmup_steps, args.ckpt_interval, args.max_steps, args.num_workers) < 0:
        raise UserError("--warmup-steps, --ckpt-interval, --max-steps and --num_workers must not be negative")


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


@torch.no_grad()
def evaluate(model: BidirectionalTransformer, corrupted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
             batch_size: int, env: DistEnv, amp: str) -> tuple[float, float]:
    """(cross-entropy without label smoothing, accuracy) over the masked val tokens; the masks are fixed."""
    model.eval()
    loss_sum = correct = count = 0.0
    for i in range(env.rank * batch_size, len(target), env.world_size * batch_size):
        t, m = target[i:i + batch_size].long(), mask[i:i + batch_size]
        with autocast(env.device, amp):
            logits = model(corrupted[i:i + batch_size].long())
        c, n = masked_correct(logits, t, m)
        loss_sum += mvtm_loss(logits, t, m).item() * n
        correct, count = correct + c, count + n
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], env)
    return loss_sum / count, correct / count


def train(args: argparse.Namespace) -> tuple[BidirectionalTransformer, BidirectionalTransformer] | None:
    """The whole run in one process of a (possibly single-process) job; returns the raw and the EMA transformer
    (None with --cache-only)."""
    check_args(args)
    env = setup_distributed(args.device)
    try:
        return _train(args, env)
    finally:
        cleanup_distributed()


def _train(args: argparse.Namespace, env: DistEnv) -> tuple[BidirectionalTransformer, BidirectionalTransformer] | None:
    out = Path(args.checkpoint_path)
    say = print if env.is_main else (lambda *a, **k: None)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    seed_everything(args.seed)  # the same initial weights on every rank

    # ---- --resume: check the saved state first, so that a wrong flag fails before any work
    state_path = out / "training_state.pt"
    state = load_training_state(state_path) if args.resume else None
    if state is not None:
        if not args.start_from_epoch:  # a run started with --start-from-epoch N resumes with --resume alone
            args.start_from_epoch = state["args"]["start_from_epoch"]
        for flag in RUN_SHAPE_FLAGS:
            if state["args"][flag] != getattr(args, flag):
                raise UserError(f"--resume: --{flag.replace('_', '-')} was {state['args'][flag]} in the saved run, "
                                f"now {getattr(args, flag)}; pass the same value")
        if state["world_size"] != env.world_size:
            raise UserError(f"--resume: the saved run used {state['world_size']} processes, now {env.world_size}")
    ensure_writable_dir(out, "--checkpoint-path")

    # ---- model: the frozen VQGAN (only to build the token cache) and the transformer
    cfg = load_maskgit_config(args.MaskGitConfig)
    maskgit = MaskGit(cfg)
    model = maskgit.transformer.to(env.device)
    seed_everything(args.seed + env.rank)  # from here on, ranks draw different masks and dropout
    if args.start_from_epoch and state is None:
        path = out / f"transformer_epoch_{args.start_from_epoch}.pt"
        load_state_dict_strict(model, load_weights(path), source=str(path))

    # ---- data: token ids from the cache (rank 0 builds it, the others wait)
    cache_path = Path(args.token_cache) if args.token_cache else out / "token_cache.pt"
    vq_ckpt = resolve_path(cfg["VQ_Configs"]["VQ_CKPT_path"])
    on_main_then_share(env, lambda: ensure_token_cache(
        maskgit.vqgan, vq_ckpt, args.train_d_path, args.val_d_path, cache_path, env.device, args.cache_precision,
        args.batch_size, args.num_workers, verbose=env.is_main))
    if args.cache_only:
        say(f"token cache ready: {cache_path}")
        return None
    maskgit.vqgan.cpu()  # never used again in this run
    cache = load_token_cache(cache_path)
    subset = torch.randperm(len(cache.train), generator=torch.Generator().manual_seed(args.seed))
    subset = subset[:max(1, round(args.partial * len(cache.train)))]
    train_tokens = torch.cat([cache.train[subset], cache.train_flip[subset]]).to(env.device)
    # validation masks are drawn once from a fixed seed, so val numbers are comparable across epochs and runs
    val_corrupted, val_mask = mask_tokens(cache.val.long(), maskgit.gamma, maskgit.mask_token_id,
                                          torch.Generator().manual_seed(1234))
    val_target, val_corrupted, val_mask = (t.to(env.device) for t in (cache.val, val_corrupted, val_mask))

    sampler = DistributedSampler(range(len(train_tokens)), num_replicas=env.world_size, rank=env.rank,
                                 shuffle=True, seed=args.seed)
    steps_per_epoch = len(sampler) // (args.batch_size * args.accum_grad)
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_tokens)} training sequences (with flips) are fewer than one optimizer step "
                        f"needs (--batch-size x --accum-grad x processes); lower them or raise --partial")
    total_steps = (args.epochs - args.start_from_epoch) * steps_per_epoch

    # ---- optimizer: AdamW, no weight decay on biases, LayerNorm and the output bias
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if p.dim() >= 2 and n != "bias"], "weight_decay": args.weight_decay},
              {"params": [p for n, p in params if p.dim() < 2 or n == "bias"], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=tuple(args.betas),
                                  fused=env.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup_steps, total_steps))
    ddp_model = DistributedDataParallel(model, device_ids=[env.device] if env.device.type == "cuda" else None) \
        if env.distributed else model
    forward = torch.compile(ddp_model) if args.compile else ddp_model  # weights are still saved from `model`
    ema = EMA(model, args.ema_decay)

    # ---- where to start: fresh, the lab's --start-from-epoch, or an exact --resume
    epoch, step, step_in_epoch, loss_sum, loss_count = args.start_from_epoch, 0, 0, 0.0, 0
    if state is not None:
        load_state_dict_strict(model, state["model"], source=str(state_path))
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        epoch, step, step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        loss_sum, loss_count = state["loss_sum"], state["loss_count"]
        set_rng_state(state["rng"][env.rank])
        say(f"resuming from {state_path}: epoch {epoch + 1}, step {step}")
    elif env.is_main and state_path.is_file():
        say(f"note: starting a new run in {out}; pass --resume to continue the saved one instead")
    log = CSVLog(out / "log.csv", LOG_FIELDS, keep_until_epoch=epoch if (args.resume or args.start_from_epoch) else None)
    if env.is_main:
        config_copy = out / Path(args.MaskGitConfig).name
        if config_copy.resolve() != Path(args.MaskGitConfig).resolve():
            atomic_write_text(Path(args.MaskGitConfig).read_text(), config_copy)
    say(f"transformer {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params | {len(train_tokens)} train "
        f"sequences (with flips), {len(val_target)} val | {env.world_size} process(es) x batch {args.batch_size} x "
        f"accum {args.accum_grad} | {steps_per_epoch} steps/epoch, {total_steps} total | device {env.device}")

    def save_weights(tag: str, raw: bool) -> None:
        check_finite_weights(model, step, state_path)
        if env.is_main:
            atomic_save(weights(ema.module), out / f"transformer_{tag}.pt")
            if raw:
                atomic_save(weights(model), out / f"transformer_raw_{tag}.pt")

    def save_state() -> None:
        check_finite_weights(model, step, state_path)
        rngs = all_gather_object(rng_state(), env)  # every rank's RNG, so a resume replays all ranks exactly
        if env.is_main:
            atomic_save({"format": TRAINING_STATE_TAG, "model": weights(model), "ema": ema.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "epoch": epoch, "step": step, "step_in_epoch": step_in_epoch, "loss_sum": loss_sum,
                         "loss_count": loss_count, "rng": rngs, "world_size": env.world_size, "args": vars(args),
                         "config": cfg}, state_path)

    # ---- the loop
    with GracefulInterrupt(verbose=env.is_main) as interrupt:
        while epoch < args.epochs:
            t0 = time.time()
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler), device=env.device)
            model.train()
            bar = tqdm(total=steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                       disable=not env.is_main, dynamic_ncols=True, leave=False)
            while step_in_epoch < steps_per_epoch:
                step_loss = torch.zeros((), device=env.device)
                for micro in range(args.accum_grad):
                    first = (step_in_epoch * args.accum_grad + micro) * args.batch_size
                    target = train_tokens[order[first:first + args.batch_size]].long()
                    corrupted, mask = mask_tokens(target, maskgit.gamma, maskgit.mask_token_id)
                    last_micro = micro == args.accum_grad - 1
                    sync = nullcontext() if last_micro or not env.distributed else ddp_model.no_sync()
                    with sync:
                        with autocast(env.device, args.amp):
                            logits = forward(corrupted)
                        loss = mvtm_loss(logits, target, mask, args.label_smoothing) / args.accum_grad
                        loss.backward()
                    step_loss += loss.detach()
                # one collective per step: the mean loss and whether any rank was interrupted
                total, interrupted = all_reduce_sum([step_loss.item(), float(interrupt.requested)], env)
                mean_loss = total / env.world_size
                if not math.isfinite(mean_loss):
                    raise diverged(f"the training loss is {mean_loss}", step + 1, state_path)
                if args.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                ema.update(model)
                step, step_in_epoch = step + 1, step_in_epoch + 1
                loss_sum, loss_count = loss_sum + mean_loss, loss_count + 1
                bar.update()
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if interrupted or step == args.max_steps:
                    bar.close()
                    save_state()
                    save_weights("last", raw=True)
                    if interrupted:
                        raise TrainingStopped(f"interrupted at step {step} (epoch {epoch + 1}): training state "
                                              f"saved to {state_path}; continue with --resume", EXIT_INTERRUPTED)
                    say(f"reached --max-steps {args.max_steps}: state saved to {state_path}; continue with --resume")
                    return model, ema.module
                if args.ckpt_interval and step % args.ckpt_interval == 0:
                    save_state()
            bar.close()

            val_loss, val_acc = evaluate(ema.module, val_corrupted, val_target, val_mask, args.batch_size, env, args.amp)
            train_loss = loss_sum / max(1, loss_count)
            epoch, step_in_epoch, loss_sum, loss_count = epoch + 1, 0, 0.0, 0
            save_weights("last", raw=True)
            if epoch % args.save_per_epoch == 0:
                save_weights(f"epoch_{epoch}", raw=False)
            if env.is_main:
                log.write({"epoch": epoch, "step": step, "train_loss": train_loss, "val_loss": val_loss,
                           "val_acc": val_acc, "lr": scheduler.get_last_lr()[0], "seconds": time.time() - t0})
            save_state()
            say(f"epoch {epoch}: train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  val_acc {val_acc:.4f}  "
                f"({time.time() - t0:.0f} s)")
    return model, ema.module


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with torch.autograd.set_detect_anomaly(args.detect_anomaly):  # restored afterwards, for in-process callers
        return run_cli(lambda: train(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
