"""bf16 autocast on CPU: would it make the CPU demo (training) or CPU scoring faster?

EfficientNet-b0 built as ``configs/demo_cpu.yaml`` builds it, 1 channel, batch 32, channels_last,
all torch threads. Times a training step (forward, backward, AdamW) and a no-grad forward at
--size px, fp32 and bf16 autocast alternating, best of --repeats, and prints img/s with the ratio.
bf16 changes the numbers (probabilities at the 1e-2 level), so it would have to pay for that.

    python benchmarks/cpu_bf16_step.py --size 96
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def images_per_s(fn, batch: int, steps: int, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks its kernels on the first call
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, time.perf_counter() - start)
    return batch * steps / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from lung_effnet.config import load_config
    from lung_effnet.console import format_table
    from lung_effnet.models.predictor import build_member

    cfg = load_config(str(ROOT / "configs" / "demo_cpu.yaml"), [f"data.image_size={args.size}"])
    torch.manual_seed(0)
    model = build_member(cfg).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.rand(args.batch, 1, args.size, args.size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (args.batch,))

    def train_step(bf16: bool) -> None:
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def forward(bf16: bool) -> None:
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x)

    rows = []
    for name, fn in (("training step", train_step), ("forward (no grad)", forward)):
        fp32 = images_per_s(lambda fn=fn: fn(False), args.batch, args.steps, args.repeats)
        bf16 = images_per_s(lambda fn=fn: fn(True), args.batch, args.steps, args.repeats)
        rows.append([name, f"{fp32:.0f}", f"{bf16:.0f}", f"{bf16 / fp32:.2f}"])
    print(format_table(["b0, " + f"{args.size} px, batch {args.batch}", "fp32 img/s", "bf16 img/s", "bf16 / fp32"], rows,
                       f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, best of {args.repeats}"))


if __name__ == "__main__":
    main()
