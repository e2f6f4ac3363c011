"""Training step time of each quantizer against plain VQ, side by side in one process.

    python bench/train_step.py [--quantizers vq,bridge] [--codebook-size 16384] [--steps 60] [--json OUT] [key=value ...]

Each quantizer gets the tiny preset's model, loss and optimiser (AdamW, gradient clipping) and the
same batches; steps alternate between the quantizers so that machine noise hits all alike. Prints
the median step time and its ratio to plain VQ.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fullvq.config import apply_override, preset
from fullvq.data import TrainCrops, load_sources
from fullvq.losses.loss import ReconstructionLoss
from fullvq.models import build_model

sys.path.insert(0, str(Path(__file__).parent))
from lookup import cpu_model  # noqa: E402


def trainer_step(cfg):
    """A closure doing one training step (forward, loss, backward, clip, AdamW) on a batch."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).train()
    criterion = ReconstructionLoss(cfg.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas)

    def step(x: torch.Tensor) -> None:
        recon, quant = model(x)
        loss = criterion("generator", x, recon, 0)[0] + quant.loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quantizers", default="vq,bridge")
    p.add_argument("--codebook-size", type=int, default=16384)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--json")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    names = args.quantizers.split(",")
    configs = {}
    for name in names:
        cfg = preset("tiny")
        cfg.quantizer.name, cfg.quantizer.codebook_size = name, args.codebook_size
        for assignment in args.overrides:
            apply_override(cfg, assignment)
        configs[name] = cfg
    steps = {name: trainer_step(cfg) for name, cfg in configs.items()}
    cfg = configs[names[0]]
    crops = TrainCrops(load_sources(cfg.data), cfg.image_size, cfg.seed)
    times = {name: [] for name in names}
    for i in range(args.warmup + args.steps):
        x = torch.stack([crops[i * cfg.batch_size + j] for j in range(cfg.batch_size)])
        for name in names:
            start = time.perf_counter()
            steps[name](x)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times[names[0]])
    print(f"# Training step, tiny preset, K={args.codebook_size}, batch {cfg.batch_size} x {cfg.image_size} px, "
          f"{torch.get_num_threads()} threads, {cpu_model()}, torch {torch.__version__}\n")
    print(f"| quantizer | median step | vs {names[0]} |")
    print("|---|---:|---:|")
    rows = {}
    for name in names:
        median = statistics.median(times[name])
        label = name + (f" {configs[name].quantizer.bridge}" if name == "bridge" else "")
        rows[label] = median
        print(f"| {label} | {median * 1000:.1f} ms | {median / base:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"median_step_s": rows, "threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
