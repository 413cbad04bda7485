"""Training throughput of the stage-2 transformer, against a plain matmul of the same precision, and what
torch.compile and the AdamW implementations are worth on this machine.

One step = forward + masked-token cross-entropy + backward + the trainer's AdamW (the model's
configure_optimizers), on random tokens (speed does not depend on the data).
FLOPs are counted analytically, matmuls only:
    per image = 6 * P_mm * N                 (forward 2, backward 4 FLOPs per weight per token)
              + 12 * L * N^2 * d             (QK^T and AV: 2 * 2N^2 d forward per layer, twice that backward)
with P_mm = all Linear weights + the tied output embedding (num_codebook_vectors+1) x d, N tokens, L layers,
d = dim. LayerNorm, GELU, softmax, dropout and the optimizer are not counted (they cost time, not counted FLOPs).
The precision is the trainer's (--amp auto: bf16 autocast where the CPU has fast bf16 kernels, else fp32).
The reference is a [4096, d] x [d, 4d] matmul in that precision, timed right after every timed step (mean of
10 runs each time, median over steps), so that both see the same load on a shared machine.

--variants times the same step several ways in one run, each from the same initial weights: the AdamW
implementations (for-loop, foreach, fused) in eager mode, and with --compile also torch.compile of the forward
(the inductor backend; its compilation is in the warm-up steps, not timed). Each variant prints its step time and
its speed relative to the first; the last line is the ratio of the trainer's own variant (eager, the AdamW
configure_optimizers picks):
    mfu_vs_matmul X.XX

    OMP_NUM_THREADS=2 python benchmarks/train_throughput.py --batch-size 16 --iters 5
    python benchmarks/train_throughput.py --config configs/MaskGit_small.yml --variants --compile
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.Transformer import ADAMW_IMPLEMENTATIONS, BidirectionalTransformer  # noqa: E402
from models.VQGAN_Transformer import mvtm_loss  # noqa: E402
from utils.cli import OneLineParser, run_cli  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.precision import AMP_CHOICES, autocast, resolve_amp  # noqa: E402


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


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/MaskGit.yml", help="MaskGIT config (Transformer_param is used)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps before timing")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                        help="bf16 autocast or fp32 (auto: bf16 where the CPU has fast bf16 kernels, as the trainer)")
    parser.add_argument("--variants", action="store_true",
                        help="also time the step with every AdamW implementation (for-loop, foreach, fused)")
    parser.add_argument("--compile", action="store_true",
                        help="with --variants: also torch.compile the forward (slow warm-up, not timed)")
    args = parser.parse_args()
    if args.iters < 1 or args.batch_size < 1 or args.warmup < 0:
        parser.error("--iters and --batch-size must be >= 1, --warmup >= 0")
    if args.compile and not args.variants:
        parser.error("--compile is one of the --variants; pass both")
    sys.exit(run_cli(lambda: measure(args)))


@dataclass(frozen=True)
class Variant:
    """One way to run the training step: the AdamW implementation (None: configure_optimizers' choice) and
    whether the forward is torch.compile'd."""
    adamw: str | None
    compiled: bool = False

    @property
    def label(self) -> str:
        return f"{'compiled' if self.compiled else 'eager'} + AdamW {self.adamw or 'default'}"


def variants(args: argparse.Namespace) -> list[Variant]:
    """The trainer's own step first (the baseline of the ratios), then the asked alternatives."""
    if not args.variants:
        return [Variant(None)]
    eager = [Variant(None)] + [Variant(impl) for impl in ADAMW_IMPLEMENTATIONS]
    return eager + ([Variant(None, compiled=True)] if args.compile else [])


def time_variant(variant: Variant, cfg: dict, args: argparse.Namespace, amp: str
                 ) -> tuple[BidirectionalTransformer, list[float], list[float]]:
    """(model, step seconds, matmul FLOP/s measured right after each step) of one variant."""
    torch.manual_seed(0)
    model = BidirectionalTransformer(cfg).train()
    opt = model.configure_optimizers(1e-4, (0.9, 0.96), 0.045, "cpu", implementation=variant.adamw)
    forward = torch.compile(model) if variant.compiled else model
    b, n = args.batch_size, cfg["num_image_tokens"]
    targets = torch.randint(0, cfg["num_codebook_vectors"], (b, n))
    masked = torch.rand(b, n) < 0.5
    tokens = targets.masked_fill(masked, model.mask_token_id)

    def step() -> None:
        with autocast(torch.device("cpu"), amp):
            logits = forward(tokens)
        loss = mvtm_loss(logits, targets, masked)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    dtype = torch.bfloat16 if amp == "bf16" else torch.float32
    a = torch.randn(4096, cfg["dim"], dtype=dtype)
    w = torch.randn(cfg["dim"], 4 * cfg["dim"], dtype=dtype)
    matmul_reference(a, w)  # warm-up
    for _ in range(args.warmup + (1 if variant.compiled else 0)):  # compiling happens in the first call
        step()
    step_sec, peaks = [], []
    for _ in tqdm(range(args.iters), desc=f"timed steps, {variant.label}", leave=False):
        t0 = time.perf_counter()
        step()
        step_sec.append(time.perf_counter() - t0)
        peaks.append(matmul_reference(a, w))
    return model, step_sec, peaks


def measure(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, required={"model_param": ["Transformer_param"]})["model_param"]["Transformer_param"]
    amp = resolve_amp(args.amp, torch.device("cpu"))
    b, n = args.batch_size, cfg["num_image_tokens"]
    results = [(v, *time_variant(v, cfg, args, amp)) for v in variants(args)]
    model, step_sec, peaks = results[0][1:]
    print(f"config {args.config}: dim {cfg['dim']}, layers {cfg['n_layers']}, tokens {n}, batch {b}, "
          f"threads {torch.get_num_threads()}, params {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M, "
          f"{'bf16' if amp == 'bf16' else 'fp32'}, CPU {torch.backends.cpu.get_cpu_capability()}")
    base = statistics.median(step_sec)
    for variant, _, sec_list, _ in results[1:]:
        sec = statistics.median(sec_list)
        print(f"{variant.label}: step {sec:.3f} s, {base / sec:.2f}x the speed of the default")
    sec = sum(step_sec) / len(step_sec)
    peak = statistics.median(peaks)
    achieved = matmul_flops_per_image(model, cfg) * b / sec
    print(f"step {sec:.3f} s   images/s {b / sec:.2f}   tokens/s {b * n / sec:.0f}")
    print(f"achieved {achieved / 1e9:.1f} GFLOP/s   {'bf16' if amp == 'bf16' else 'fp32'} matmul "
          f"[4096,{cfg['dim']}]x[{cfg['dim']},{4 * cfg['dim']}] "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"mfu_vs_matmul {achieved / peak:.2f}")


if __name__ == "__main__":
    main()
