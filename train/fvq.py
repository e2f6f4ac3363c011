"""Train a tokenizer: `python train/fvq.py` (tiny preset, VQBridge, offline photos, CPU, minutes).

    python train/fvq.py [--quantizer vq|ema|fc|lc|simvq|bridge] [--codebook-size K] [--steps N] ...
        [key=value ...]                       # any other Config field, e.g. loss.perceptual_weight=1
    torchrun --nproc_per_node=8 train/fvq.py --preset fvq --data /imagenet/train --val-data /imagenet/val
    torchrun --nproc_per_node=8 train/fvq.py --preset fvq --codebook-size 262144 ...   # QBridge-L/8, as FVQ

--preset fvq is FVQ's ImageNet recipe (scripts/recon/FVQ-*.sh): global batch 128 over the processes,
40 epochs, the bridge FVQ picks for K. --steps N replaces a preset's epochs, --batch-size B its
global batch (B per process).
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
    "batch_size": "batch_size", "global_batch_size": "global_batch_size", "epochs": "epochs",
    "image_size": "image_size", "data": "data", "val_data": "val_data", "seed": "seed",
}
REPLACES = {"steps": "epochs=0", "batch_size": "global_batch_size=0"}  # a flag given replaces the preset's other way


def parse(argv: list[str]) -> tuple:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--out", help="run folder (default runs/fvq)")
    p.add_argument("--quantizer", choices=QUANTIZERS)
    p.add_argument("--codebook-size", type=int, metavar="K")
    p.add_argument("--codebook-dim", type=int, metavar="D")
    p.add_argument("--bridge", metavar="NAME", help="VQBridge config by FVQ's names (L/8, B/4-d4, QBridge-L/4), a "
                                                   "spelled-out W<width>-H<heads>-D<depth>/<patch>, or auto (FVQ's "
                                                   "choice for K: L/4 up to 16,384 codes, L/8 beyond)")
    p.add_argument("--steps", type=int, help="training steps (replaces the preset's --epochs)")
    p.add_argument("--epochs", type=int, help="passes over --data, counted in whole global batches")
    p.add_argument("--batch-size", type=int, help="per process (replaces the preset's --global-batch-size)")
    p.add_argument("--global-batch-size", type=int, metavar="B", help="split over the torchrun processes")
    p.add_argument("--image-size", type=int, metavar="S", help="training crop size")
    p.add_argument("--data", metavar="DIR", help="folder of images (default: photos shipped in pip packages)")
    p.add_argument("--val-data", metavar="DIR", help="held-out images for the final evaluation (default: the "
                                                     "held-out quarter of each training image)")
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
                if flag in REPLACES:
                    apply_override(cfg, REPLACES[flag])
                apply_override(cfg, f"{key}={getattr(args, flag)}")
        for assignment in args.overrides:
            apply_override(cfg, assignment)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"fvq.py: {e}")
    try:
        metrics = train(cfg, resume=args.resume)
    except OSError as e:  # an unwritable --out, a full disk (checkpoint.CheckpointWriteError says what to do)
        sys.exit(f"fvq.py: {e}")
    if metrics is not None:
        print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
