"""Train the class-conditional generator on a tokenizer's codes: `python train/gpt.py --codes runs/codes`.

    python train/extract_codes.py runs/fvq/ckpt.pt --out runs/codes     # first: tokenize images
    python train/gpt.py --codes runs/codes [--preset tiny|B|L|XL] [--steps N] [--batch-size B] [--out DIR]
        [key=value ...]                     # any other GPTConfig field, e.g. lr=3e-4 model.class_dropout=0
    torchrun --nproc_per_node=8 train/gpt.py --codes runs/codes-in256 --preset B --out runs/gpt-b

The vocabulary, token grid and classes come from the codes folder; --resume continues OUT/ckpt.pt
with its own config (and codes), changed by the flags given now (e.g. --steps to extend it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fullvq import checkpoint
from fullvq.codes import read_codes
from fullvq.config import apply_override
from fullvq.gpt_config import GPT_PRESETS, GPTConfig, gpt_preset
from fullvq.gpt_trainer import NO_CODES, check_codes, train

FLAGS = {"codes": "codes", "out": "out", "steps": "steps", "batch_size": "batch_size", "seed": "seed"}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--codes", metavar="CODES", help="codes folder written by train/extract_codes.py")
    p.add_argument("--preset", default="tiny", choices=list(GPT_PRESETS))
    p.add_argument("--out", help="run folder (default runs/gpt)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue OUT/ckpt.pt")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any other config field")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    cfg = gpt_preset(args.preset)
    try:
        if args.resume:  # the run's own config; flags given now change it
            path = Path(args.out or cfg.out) / "ckpt.pt"
            cfg = GPTConfig.from_dict(checkpoint.require_gpt(checkpoint.load(path), path)["config"])
        for flag, key in FLAGS.items():
            if getattr(args, flag) is not None:
                apply_override(cfg, f"{key}={getattr(args, flag)}")
        for assignment in args.overrides:
            apply_override(cfg, assignment)
        if not cfg.codes:
            sys.exit(f"gpt.py: {NO_CODES}")
        meta = read_codes(cfg.codes)[2]
        if args.resume:
            check_codes(cfg, meta)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"gpt.py: {e}")
    try:
        metrics = train(cfg, resume=args.resume)
    except OSError as e:  # an unwritable --out, a full disk (checkpoint.CheckpointWriteError says what to do)
        sys.exit(f"gpt.py: {e}")
    if metrics is not None:
        print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
