"""The autoencoder's swish: torch's fused F.silu (what fullvq uses) against LlamaGen's x * sigmoid(x).

    python bench/activation.py [--batch 512] [--codebook-size 1024] [--steps 6]

Times whole training steps of the tiny preset (simvq, the quantizer cheapest to run beside a
large batch) with each activation in turn, steps interleaved in one process so that machine
noise hits both alike, and the largest difference between the two activations on 2^20 normal
values. Prints a Markdown table of median step times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fullvq.models.autoencoder as autoencoder
from fullvq.config import preset
from fullvq.data import TrainCrops, load_sources

sys.path.insert(0, str(Path(__file__).parent))
from lookup import cpu_model  # noqa: E402
from train_step import trainer_step  # noqa: E402

OURS, LLAMAGEN = "F.silu (fullvq)", "x * sigmoid(x) (LlamaGen)"
ACTIVATIONS = {OURS: F.silu, LLAMAGEN: lambda x: x * torch.sigmoid(x)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--codebook-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6, help="timed steps per activation, after one warm-up each")
    args = p.parse_args()
    cfg = preset("tiny")
    cfg.quantizer.name, cfg.quantizer.codebook_size, cfg.batch_size = "simvq", args.codebook_size, args.batch
    crops = TrainCrops(load_sources(cfg.data), cfg.image_size, cfg.seed)
    x = torch.stack([crops[j] for j in range(cfg.batch_size)])
    step = trainer_step(cfg)
    probe = torch.randn(1 << 20)
    gap = (ACTIVATIONS[OURS](probe) - ACTIVATIONS[LLAMAGEN](probe)).abs().max()
    original = autoencoder.swish
    times = {name: [] for name in ACTIVATIONS}
    for i in range(args.steps + 1):
        for name, fn in ACTIVATIONS.items():
            autoencoder.swish = fn
            start = time.perf_counter()
            step(x)
            if i:
                times[name].append(time.perf_counter() - start)
    autoencoder.swish = original
    base = statistics.median(times[LLAMAGEN])
    print(f"# Training step, tiny preset, simvq K={args.codebook_size}, batch {args.batch} x {cfg.image_size} px, "
          f"{torch.get_num_threads()} threads, {cpu_model()}, torch {torch.__version__}; "
          f"largest |silu - x*sigmoid(x)| on 2^20 normal values: {gap:.1e}\n")
    print("| activation | median step | vs x * sigmoid(x) |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} s | {statistics.median(ts) / base:.2f}x |")


if __name__ == "__main__":
    main()
