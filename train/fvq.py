"""Train a tokenizer: `python train/fvq.py` (tiny preset, VQBridge, offline photos, CPU, minutes).

    python train/fvq.py [--quantizer vq|ema|fc|lc|simvq|bridge] [--codebook-size K] [--steps N] ...
        [key=value ...]                       # any other Config field, e.g. loss.perceptual_weight=1
    torchrun --nproc_per_node=8 train/fvq.py --preset vq16 --data /imagenet/train
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fullvq import checkpoint
from fullvq.config import PRESETS, QUANTIZERS, Config, apply_override, preset
from fullvq.trainer import train

FLAGS = {  # flag -> config key
    "out": "out", "quantizer": "quantizer.name", "codebook_size": "quantizer.codebook_size",
    "codebook_dim": "quantizer.codebook_dim", "bridge": "quantizer.bridge", "steps": "steps",
    "batch_size": "batch_size", "image_size": "image_size", "data": "data", "seed": "seed",
}


def parse(argv: list[str]) -> tuple:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--out", help="run folder (default runs/fvq)")
    p.add_argument("--quantizer", choices=QUANTIZERS)
    p.add_argument("--codebook-size", type=int, metavar="K")
    p.add_argument("--codebook-dim", type=int, metavar="D")
    p.add_argument("--bridge", metavar="NAME", help="VQBridge config, e.g. S/4, L/8")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--image-size", type=int, metavar="S", help="training crop size")
    p.add_argument("--data", metavar="DIR", help="folder of images (default: photos shipped in pip packages)")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue OUT/ckpt.pt")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any other config field")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    cfg = preset(args.preset)
    try:
        if args.resume:  # the run's own config; flags given now change it (e.g. --steps to extend)
            out = args.out or cfg.out
            cfg = Config.from_dict(checkpoint.load(Path(out) / "ckpt.pt")["config"])
        for flag, key in FLAGS.items():
            if getattr(args, flag) is not None:
                apply_override(cfg, f"{key}={getattr(args, flag)}")
        for assignment in args.overrides:
            apply_override(cfg, assignment)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"fvq.py: {e}")
    metrics = train(cfg, resume=args.resume)
    if metrics is not None:
        print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
