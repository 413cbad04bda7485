"""Training throughput of the stage-2 transformer: the trainer's own optimizer step, against a plain matmul of the
same precision, and what torch.compile and the AdamW implementations are worth on this machine.

One step is TransformerTrainer's (training/transformer.py), built as training_transformer.py builds it for the config:
its train_param recipe and the flags' defaults (uniform MVTM masks, label smoothing, autocast precision, gradient
clipping, AdamW, schedule, EMA update), on random tokens (speed does not depend on the data). Any other flag of
training_transformer.py passes through (e.g. --train-masks mix --hole-mask-prob 0.5, as a run was started).
FLOPs are counted analytically, matmuls only, for all N positions:
    per image = 6 * P_mm * N                 (forward 2, backward 4 FLOPs per weight per token)
              + 12 * L * N^2 * d             (QK^T and AV: 2 * 2N^2 d forward per layer, twice that backward)
with P_mm = all Linear weights + the tied output embedding (num_codebook_vectors+1) x d, N tokens, L layers,
d = dim. LayerNorm, GELU, softmax, dropout and the optimizer are not counted (they cost time, not counted FLOPs).
Work a version of the step skips still counts (all N positions, though the trainer's output head runs on the masked
positions only), so it shows as effective throughput and the numbers compare across versions of the step.
The precision is the trainer's (--amp auto: bf16 autocast where the CPU has fast bf16 kernels, else fp32).
The reference is a [4096, d] x [d, 4d] matmul in that precision, timed right after every timed step (mean of
10 runs each time, median over steps), so that both see the same load on a shared machine.

--variants times the same step several ways in one run, each from the same initial weights and masks: the AdamW
implementations (for-loop, foreach, fused) in eager mode, and with --compile also torch.compile of the forward
(the trainer's --compile, inductor; its compilation is in the warm-up steps, not timed). Each variant prints its
step time and its speed relative to the first; the last line is the ratio of the trainer's own variant (eager, the
AdamW configure_optimizers picks):
    mfu_vs_matmul X.XX

--breakdown then runs as many steps again under torch.profiler and prints where the step's time goes (self CPU
time per aten op, per step) and the ceiling it sets: the counted FLOPs over the time of the matmul ops alone
(mm, bmm, addmm, baddbmm), against the same reference. That is the mfu_vs_matmul the step would reach if
everything else (softmax, GELU, LayerNorm, copies, the loss, AdamW) took no time at all. The profiler's own cost
per op makes its shares approximate; the step time and mfu_vs_matmul above come from the unprofiled steps.

    OMP_NUM_THREADS=2 python benchmarks/train_throughput.py      # the config training_transformer.py defaults to
    python benchmarks/train_throughput.py --config configs/studies/small_gan_no_dropout.yml --batch-size 32
    python benchmarks/train_throughput.py --config configs/studies/small_gan_no_dropout.yml --train-masks mix
    python benchmarks/train_throughput.py --config configs/MaskGit_lab_small_vqgan.yml --batch-size 16  # lab size
    python benchmarks/train_throughput.py --config configs/MaskGit_small.yml --variants --compile
    python benchmarks/train_throughput.py --config configs/MaskGit_small_gan.yml --batch-size 32 --breakdown
    python benchmarks/train_throughput.py --config configs/studies/small_gan_pixels.yml --batch-size 32 \
        --train-masks mix --hole-mask-prob 0.5 --shift-cost --iters 20     # the long run's step; what shift costs

--shift-cost times the step with --augment flip and with --augment shift in alternated blocks of --iters steps,
whose cached jitters (training/augment.py) add a gather of one cached grid per sample and the resampling of its
pixels; it prints the ratio of the two medians less one:
    shift_cost X.XXX
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.Transformer import ADAMW_IMPLEMENTATIONS, BidirectionalTransformer  # noqa: E402
from models.VQGAN_Transformer import MaskGit, load_maskgit_config  # noqa: E402
from training.augment import SHIFT_VARIANTS, draw_jitters  # noqa: E402
from training.transformer import (DEFAULT_CONFIG, TokenData, TransformerTrainer, fill_defaults,  # noqa: E402
                                  training_parser, trains_on_images)
from utils.cli import OneLineParser, run_cli  # noqa: E402
from utils.image import IMAGE_SIZE  # noqa: E402
from utils.precision import AMP_CHOICES, device_name, resolve_amp  # noqa: E402
from utils.train_utils import DistEnv, GracefulInterrupt, seed_everything  # noqa: E402

CPU = torch.device("cpu")
MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")  # where the counted FLOPs are done
TOP_OPS = 8  # ops listed by --breakdown
SHIFT_COST_BLOCKS = 3  # --shift-cost: blocks of --iters steps with flips, then with shifts, this many times each


def matmul_flops_per_image(model: BidirectionalTransformer, cfg: dict) -> float:
    """Training FLOPs of one image's forward + backward, matmuls only (formula in the module docstring)."""
    n, d, layers = cfg["num_image_tokens"], cfg["dim"], cfg["n_layers"]
    p_mm = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)) + model.tok_emb.weight.numel()
    return 6.0 * p_mm * n + 12.0 * layers * n * n * d


def matmul_reference(a: torch.Tensor, b: torch.Tensor, reps: int = 10) -> float:
    """Mean FLOP/s of a @ b over `reps` runs: what the CPU's bf16 GEMM reaches at this size right now."""
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2.0 * a.shape[0] * a.shape[1] * b.shape[1] * reps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="MaskGIT config (its VQGAN checkpoint must exist)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's train_param, as training")
    parser.add_argument("--iters", type=int, default=5, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps before timing")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                        help="bf16 autocast or fp32 (auto: bf16 where the CPU has fast bf16 kernels, as the trainer)")
    parser.add_argument("--variants", action="store_true",
                        help="also time the step with every AdamW implementation (for-loop, foreach, fused)")
    parser.add_argument("--compile", action="store_true",
                        help="with --variants: also torch.compile the forward (slow warm-up, not timed)")
    parser.add_argument("--shift-cost", action="store_true",
                        help="time the step with --augment flip and with --augment shift (its cached jitters) in "
                             "alternated blocks, and print the shift's share of a step")
    parser.add_argument("--breakdown", action="store_true",
                        help="then profile as many steps of the trainer's own variant: time per op and the matmuls' "
                             "ceiling on mfu_vs_matmul")
    args, args.training_flags = parser.parse_known_args(argv)
    if args.iters < 1 or (args.batch_size is not None and args.batch_size < 1) or args.warmup < 0:
        parser.error("--iters and --batch-size must be >= 1, --warmup >= 0")
    if args.compile and not args.variants:
        parser.error("--compile is one of the --variants; pass both")
    if args.shift_cost and args.variants:
        parser.error("--shift-cost and --variants time different pairs; pass one")
    return run_cli(lambda: measure(args))


@dataclass(frozen=True)
class Variant:
    """One way to run the training step: the AdamW implementation (None: configure_optimizers' choice), whether the
    forward is torch.compile'd, and the augmentation (None: the flags')."""
    adamw: str | None
    compiled: bool = False
    augment: str | None = None

    @property
    def label(self) -> str:
        return f"{'compiled' if self.compiled else 'eager'} + AdamW {self.adamw or 'default'}" + (
            f" + augment {self.augment}" if self.augment else "")


def variants(args: argparse.Namespace) -> list[Variant]:
    """The trainer's own step first (the baseline of the ratios), then the asked alternatives."""
    if args.shift_cost:  # alternated blocks, so that a drift in the machine's speed falls on both alike
        return [Variant(None, augment=augment) for _ in range(SHIFT_COST_BLOCKS) for augment in ("flip", "shift")]
    if not args.variants:
        return [Variant(None)]
    eager = [Variant(None)] + [Variant(impl) for impl in ADAMW_IMPLEMENTATIONS]
    return eager + ([Variant(None, compiled=True)] if args.compile else [])


def training_args(args: argparse.Namespace) -> argparse.Namespace:
    """training_transformer.py's flags for this config, batch size, precision and the passed-through training
    flags, with their defaults filled."""
    argv = ["--MaskGitConfig", args.config, "--device", "cpu", "--amp", args.amp, *args.training_flags]
    targs = training_parser().parse_args(argv + (["--batch-size", str(args.batch_size)] if args.batch_size else []))
    fill_defaults(targs)
    targs.amp = resolve_amp(targs.amp, CPU)
    return targs


def op_seconds(steps: Iterator[float], count: int) -> dict[str, float]:
    """Self CPU seconds per step of every aten op over the next `count` steps, under torch.profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(count):
            next(steps)
    return {e.key: e.self_cpu_time_total / 1e6 / count for e in prof.key_averages() if e.key.startswith("aten::")}


@dataclass
class Timing:
    """One variant's step seconds, the reference matmul's FLOP/s right after each step, and (--breakdown) the
    self seconds per step of each op."""
    step_sec: list[float]
    peaks: list[float]
    ops: dict[str, float] | None = None


def time_variant(variant: Variant, maskgit: MaskGit, initial: dict[str, torch.Tensor], targs: argparse.Namespace,
                 args: argparse.Namespace, out: Path, profile: bool = False) -> Timing:
    """The timed steps of one variant from the `initial` weights, and with `profile` as many more under the
    profiler."""
    maskgit.transformer.load_state_dict(initial)
    seed_everything(targs.seed)
    images, n = targs.batch_size * targs.accum_grad, maskgit.num_image_tokens
    total_steps = args.warmup + args.iters * (2 if profile else 1) + 1
    tokens = torch.randint(0, maskgit.transformer.num_codebook_vectors, (images * total_steps, n))
    targs.compile = variant.compiled
    targs.augment = variant.augment or targs.augment
    pixels = shifted = None
    if trains_on_images(maskgit.transformer, targs.augment):
        pixels = torch.randint(0, 256, (len(tokens), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8).numpy()
        pixels = (pixels, pixels[:1])
    if targs.augment == "shift":  # random grids and jitters in place of the cache's: the same gathers and resampling
        grids = (SHIFT_VARIANTS, 2 * len(tokens))
        shifted = (torch.randint(0, maskgit.transformer.num_codebook_vectors, (*grids, n)),
                   draw_jitters(grids[0] * grids[1]).view(*grids, 3))
    data = TokenData.from_tokens(tokens, tokens, tokens[:1], maskgit, 1.0, targs.seed, CPU, images=pixels,
                                 shifted=shifted)
    trainer = TransformerTrainer(maskgit, data, targs, {}, DistEnv(0, 1, CPU), out, adamw=variant.adamw)
    steps = trainer.steps_until(lambda: False, GracefulInterrupt(verbose=False))  # never entered: Ctrl-C stops it
    dtype = torch.bfloat16 if targs.amp == "bf16" else torch.float32
    d = maskgit.transformer.tok_emb.embedding_dim
    a, w = torch.randn(4096, d, dtype=dtype), torch.randn(d, 4 * d, dtype=dtype)
    matmul_reference(a, w)  # warm-up
    for _ in range(args.warmup + (1 if variant.compiled else 0)):  # compiling happens in the first call
        next(steps)
    step_sec, peaks = [], []
    for _ in tqdm(range(args.iters), desc=f"timed steps, {variant.label}", leave=False):
        t0 = time.perf_counter()
        next(steps)
        step_sec.append(time.perf_counter() - t0)
        peaks.append(matmul_reference(a, w))
    return Timing(step_sec, peaks, op_seconds(steps, args.iters) if profile else None)


def measure(args: argparse.Namespace) -> None:
    targs = training_args(args)
    seed_everything(targs.seed)  # the initial weights of a training run with these flags
    maskgit_cfg = load_maskgit_config(args.config)
    maskgit = MaskGit(maskgit_cfg)
    model, cfg = maskgit.transformer, maskgit_cfg["Transformer_param"]
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as out:  # the trainer's folder; a step writes nothing
        results = [(v, time_variant(v, maskgit, initial, targs, args, Path(out), profile=args.breakdown and i == 0))
                   for i, v in enumerate(variants(args))]
    own = results[0][1]
    b, n = targs.batch_size * targs.accum_grad, cfg["num_image_tokens"]  # images per optimizer step
    precision = "bf16" if targs.amp == "bf16" else "fp32"
    print(f"config {args.config}: dim {cfg['dim']}, layers {cfg['n_layers']}, tokens {n}, batch {b}, "
          f"threads {torch.get_num_threads()}, params {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M, "
          f"{precision}, CPU {device_name(CPU)}, ATen kernels {torch.backends.cpu.get_cpu_capability()}, "
          f"dropout {model.drop.p}, attn_dropout {model.blocks[0].Attention.attn_drop.p}; the trainer's step "
          f"(train masks {targs.train_masks}, label smoothing {targs.label_smoothing}, grad clip {targs.grad_clip}, "
          f"EMA {targs.ema_decay})")
    base = statistics.median(own.step_sec)
    for variant, timing in results[1:]:
        sec = statistics.median(timing.step_sec)
        print(f"{variant.label}: step {sec:.3f} s, {base / sec:.2f}x the speed of the default")
    if args.shift_cost:
        steps = {a: [t for v, timing in results if v.augment == a for t in timing.step_sec] for a in ("flip", "shift")}
        print(f"shift_cost {statistics.median(steps['shift']) / statistics.median(steps['flip']) - 1:+.3f} (medians "
              f"of {len(steps['flip'])} steps each, in {SHIFT_COST_BLOCKS} alternated blocks)")
    sec = sum(own.step_sec) / len(own.step_sec)
    peak = statistics.median(own.peaks)
    flops = matmul_flops_per_image(model, cfg) * b
    achieved = flops / sec
    print(f"step {sec:.3f} s   images/s {b / sec:.2f}   tokens/s {b * n / sec:.0f}")
    print(f"achieved {achieved / 1e9:.1f} GFLOP/s (matmul FLOPs of all {n} positions: skipped work counts as "
          f"throughput)   {precision} matmul [4096,{cfg['dim']}]x[{cfg['dim']},{4 * cfg['dim']}] "
          f"{peak / 1e9:.1f} GFLOP/s")
    if own.ops is not None:
        print_breakdown(own.ops, flops, peak)
    print(f"mfu_vs_matmul {achieved / peak:.2f}")


def print_breakdown(ops: dict[str, float], flops: float, peak: float) -> None:
    """The ops that take the step's time, and the mfu_vs_matmul the step's matmuls alone would allow."""
    total = sum(ops.values())
    print(f"profiled step {total:.3f} s of aten ops (self time; the profiler adds its own cost per op):")
    for name, sec in sorted(ops.items(), key=lambda item: -item[1])[:TOP_OPS]:
        print(f"  {name:<36} {sec:.4f} s  {100 * sec / total:4.1f} %")
    matmul_sec = sum(ops.get(name, 0.0) for name in MATMUL_OPS)
    print(f"matmuls ({', '.join(MATMUL_OPS)}): {matmul_sec:.3f} s per step, {100 * matmul_sec / total:.0f} % of it, "
          f"{flops / matmul_sec / 1e9:.1f} GFLOP/s of counted FLOPs: with everything else free, mfu_vs_matmul "
          f"would reach at most {flops / matmul_sec / peak:.2f}")


if __name__ == "__main__":
    sys.exit(main())
