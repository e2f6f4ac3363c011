"""Sample images from a generator checkpoint: class labels -> token grids -> the tokenizer's decoder -> a PNG grid.

    python train/sample.py runs/gpt/ckpt.pt --classes 0,1,2 --cfg 4 --out samples.png
    python train/sample.py runs/gpt/ckpt.pt --per-class 8 --top-k 1000 --seed 1

--classes samples one image per listed class (repeat a class for more); --per-class N samples N
images of every class the generator knows (the default is one of each). Images fill the PNG row by
row, --columns per row. The tokens come from the PyTorch reference sampler (fullvq.sampling), batch
by batch: batch i uses seed + i, so the images depend on --seed and --batch-size. The tokenizer is
the checkpoint recorded in the generator's config unless --tokenizer names another.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fullvq import checkpoint
from fullvq.sampling import check_sampling, generate


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("checkpoint", metavar="GPT_CKPT")
    p.add_argument("--tokenizer", metavar="CKPT", help="tokenizer checkpoint (default: the generator config's)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--classes", metavar="LIST", help="comma-separated class ids, one image each")
    which.add_argument("--per-class", type=int, default=1, metavar="N", help="N images of every class (default 1)")
    p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off; 1 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--columns", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="samples.png")
    return p.parse_args(argv)


def image_grid(images: torch.Tensor, columns: int) -> np.ndarray:
    """images (N, 3, H, W) in [-1, 1] -> (rows * H, columns * W, 3) uint8, row by row, black where
    the last row is short."""
    n, c, h, w = images.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    canvas = images.new_full((rows * columns, c, h, w), -1.0)
    canvas[:n] = images
    grid = canvas.view(rows, columns, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, columns * w, c)
    return ((grid.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()


def _labels(args: argparse.Namespace, num_classes: int) -> torch.Tensor:
    if args.classes is None:
        if args.per_class < 1:
            raise ValueError(f"--per-class {args.per_class}: expected at least 1")
        return torch.arange(num_classes).repeat_interleave(args.per_class)
    try:
        labels = torch.tensor([int(c) for c in args.classes.split(",")])
    except ValueError:
        raise ValueError(f"--classes {args.classes!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"--classes {args.classes!r}: the generator knows classes 0 .. {num_classes - 1}")
    return labels


def main(argv: list[str] | None = None) -> Path:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        check_sampling(args.cfg, args.temperature, args.top_k, args.top_p)
        if args.batch_size < 1 or args.columns < 1:
            raise ValueError(f"--batch-size {args.batch_size} and --columns {args.columns}: each must be at least 1")
        gpt, cfg = checkpoint.load_gpt(args.checkpoint)
        labels = _labels(args, cfg.num_classes)
        tokenizer_path = args.tokenizer or cfg.tokenizer
        if not tokenizer_path:
            raise ValueError(f"{args.checkpoint} records no tokenizer: pass --tokenizer CKPT")
        vq, _ = checkpoint.load_model(tokenizer_path)
        codebook = vq.quantize.bake()
        if codebook.dim() != 2 or len(codebook) != cfg.vocab_size:
            raise ValueError(f"the tokenizer {tokenizer_path} has a codebook of shape {tuple(codebook.shape)}; the "
                             f"generator needs ({cfg.vocab_size}, D): pass the tokenizer that made its codes")
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"sample.py: {e}")
    gpt, vq, codebook = gpt.to(args.device), vq.to(args.device), codebook.to(args.device)
    images = []
    for i, batch in enumerate(labels.split(args.batch_size)):
        tokens = generate(gpt, batch, args.cfg, args.temperature, args.top_k, args.top_p, seed=args.seed + i)
        with torch.no_grad():
            images.append(vq.decode_codes(tokens.view(len(batch), *cfg.grid), codebook).cpu())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(torch.cat(images), args.columns)).save(out)
    print(f"wrote {len(labels)} samples to {out}")
    return out


if __name__ == "__main__":
    main()
