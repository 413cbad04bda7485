"""Stage-1 training throughput: images/s of a full step (generator with the GAN loss and its adaptive weight,
then the discriminator), and how close that step comes to the CPU's own 3x3-conv speed.

FLOPs of the step are counted by torch.utils.flop_counter (every convolution, matmul and bmm, forward and
backward, including the adaptive weight's two extra gradient passes). The step runs in the precision and
memory layout the trainer picks for this device (utils/precision.py; --amp overrides the precision). The
reference is one lone 3x3 conv, forward + backward, in the same precision and layout, at the config's dominant
width and resolution (the 3x3 conv shape that carries the most FLOPs of the step), timed right after every
timed step so that both see the same load on a shared machine. The last line is the ratio of the two rates:
    conv_efficiency X.XX

    python benchmarks/vqgan_train_throughput.py --config configs/VQGAN_small.yml
    python benchmarks/vqgan_train_throughput.py --config configs/VQGAN.yml --iters 3 --compare-layouts
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.VQGAN import load_vqgan_config  # noqa: E402
from training.vqgan import VQGANTrainer  # noqa: E402
from utils.config import ConfigError, load_config  # noqa: E402
from utils.precision import AMP_CHOICES, autocast, conv_memory_format  # noqa: E402


LAYOUT_NAMES = {torch.channels_last: "channels_last", torch.contiguous_format: "contiguous"}


def dominant_conv(trainer: VQGANTrainer, x: torch.Tensor) -> tuple[int, int, int]:
    """(channels, height, width) of the square 3x3 conv shape with the most forward FLOPs in the generator."""
    flops: Counter = Counter()

    def hook(module: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
        if module.kernel_size == (3, 3) and module.in_channels == module.out_channels:
            key = (module.out_channels, output.shape[2], output.shape[3])
            flops[key] += 2 * module.in_channels * module.out_channels * 9 * output[0, 0].numel()

    handles = [m.register_forward_hook(hook) for m in trainer.model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        trainer.model(x)
    for h in handles:
        h.remove()
    return flops.most_common(1)[0][0]


def lone_conv_rate(conv: nn.Conv2d, x: torch.Tensor, amp: str, reps: int = 3) -> float:
    """FLOP/s of forward + backward of one 3x3 conv (3x the forward FLOPs)."""
    flops = 3 * 2 * conv.in_channels * conv.out_channels * 9 * x.shape[0] * x.shape[2] * x.shape[3]
    t0 = time.perf_counter()
    for _ in range(reps):
        with autocast(x.device, amp):
            y = conv(x)
        y.float().sum().backward()
    return flops * reps / (time.perf_counter() - t0)


def time_steps(trainer: VQGANTrainer, x: torch.Tensor, iters: int, warmup: int,
               reference: tuple[nn.Conv2d, torch.Tensor, str]) -> tuple[float, float]:
    """Mean seconds per training step and the median lone-conv rate measured between the steps."""
    for _ in range(warmup):
        trainer.train_step(x)
    lone_conv_rate(*reference)
    step_sec, rates = [], []
    for _ in tqdm(range(iters), desc="timed steps", leave=False):
        t0 = time.perf_counter()
        trainer.train_step(x)
        step_sec.append(time.perf_counter() - t0)
        rates.append(lone_conv_rate(*reference))
    return sum(step_sec) / len(step_sec), statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/VQGAN_small.yml", help="VQGAN config (model_param, train_param)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's train_param.batch_size")
    parser.add_argument("--iters", type=int, default=5, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps before timing")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="auto", help="auto: bf16 where it is faster here")
    parser.add_argument("--compare-layouts", action="store_true",
                        help="also time the step in the other memory layout (channels_last vs contiguous)")
    args = parser.parse_args()
    try:
        model_cfg = load_vqgan_config(args.config)
        train_param = load_config(args.config).get("train_param") or {}
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if args.batch_size is not None:
        train_param["batch_size"] = args.batch_size
    if args.iters < 1 or args.warmup < 0 or train_param.get("batch_size", 1) < 1:
        parser.error("--iters and --batch-size must be >= 1, --warmup >= 0")

    torch.manual_seed(0)
    device = torch.device("cpu")
    trainer = VQGANTrainer(model_cfg, {**train_param, "disc_start": 0}, device, args.amp)  # GAN on: the costliest step
    layout = conv_memory_format(device)
    b = int(trainer.tp["batch_size"])
    x = torch.randn(b, model_cfg["image_channels"], model_cfg["img_resolution"], model_cfg["img_resolution"])
    x = x.clamp(-1, 1).contiguous(memory_format=layout)
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(x)
    step_flops = counter.get_total_flops()
    c, h, w = dominant_conv(trainer, x)
    conv = nn.Conv2d(c, c, 3, 1, 1).to(memory_format=layout)
    conv_x = torch.randn(b, c, h, w).contiguous(memory_format=layout).requires_grad_(True)
    reference = (conv, conv_x, trainer.amp)

    sec, conv_rate = time_steps(trainer, x, args.iters, args.warmup, reference)
    params = sum(p.numel() for p in trainer.model.parameters()) / 1e6
    print(f"config {args.config}: enc {model_cfg['enc_channels']}, dec {model_cfg['dec_channels']}, "
          f"{params:.2f}M params, batch {b}, threads {torch.get_num_threads()}, "
          f"{'bf16' if trainer.amp == 'bf16' else 'fp32'}, {LAYOUT_NAMES[layout]}")
    print(f"step {sec:.3f} s   images/s {b / sec:.2f}   {step_flops / b / 1e9:.2f} GFLOP per image")
    if args.compare_layouts:
        other = torch.contiguous_format if layout == torch.channels_last else torch.channels_last
        trainer.model.to(memory_format=other)
        trainer.disc.to(memory_format=other)
        sec_other, _ = time_steps(trainer, x.contiguous(memory_format=other), args.iters, args.warmup, reference)
        print(f"{LAYOUT_NAMES[other]} step {sec_other:.3f} s   {LAYOUT_NAMES[layout]} is {sec_other / sec:.2f}x as fast")
    achieved = step_flops / sec
    print(f"achieved {achieved / 1e9:.1f} GFLOP/s   lone 3x3 conv {c}ch @ {h}x{w} {conv_rate / 1e9:.1f} GFLOP/s")
    print(f"conv_efficiency {achieved / conv_rate:.2f}")


if __name__ == "__main__":
    main()
