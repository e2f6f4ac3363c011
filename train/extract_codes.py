"""Tokenize a labelled image set for generator training: `python train/extract_codes.py CKPT --out CODES`.

    python train/extract_codes.py runs/fvq/ckpt.pt --out runs/codes        # the offline default photos
    torchrun --nproc_per_node=8 train/extract_codes.py runs/vq16/ckpt.pt --data /imagenet/train --out runs/codes-in256

--data DIR holds one folder of images per class (DIR/<class>/..., the ImageNet layout; label = index of
the class folder in sorted order). Each image's short side is resized to the tokenizer's image size
(or --image-size) and the center square kept, as LlamaGen's extract_codes does (ADM's
center_crop_arr: smaller images are enlarged, and counted); unreadable files are skipped and
listed. Without --data, each default photo is one class and its training part (the left three
quarters, as train/fvq.py splits it) is cut into non-overlapping tiles. Every image is also
encoded mirrored unless --no-flip. fullvq.codes describes the folder written; train/gpt.py reads it.

--image-size may differ from the size the tokenizer was trained at (its networks are convolutional):
any multiple S of its downsampling factor f gives (S/f) x (S/f) grids, e.g. 32 x 32 tokens at 512 px
from a 256 px, f = 16 tokenizer. meta.json records both sizes and the grid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fullvq import checkpoint, distributed
from fullvq.codes import check_writable, extract, labelled_sources, token_grid, write_codes


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", help="tokenizer checkpoint (train/fvq.py); its EMA weights if kept")
    p.add_argument("--data", metavar="DIR", help="class folders of images (default: photos shipped in pip packages)")
    p.add_argument("--out", required=True, metavar="CODES", help="codes folder to write")
    p.add_argument("--image-size", type=int, metavar="S", help="default: the tokenizer's training size")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (per process)")
    p.add_argument("--no-flip", action="store_true", help="do not add the codes of mirrored images")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        model, cfg = checkpoint.load_model(args.checkpoint)
        size = args.image_size or cfg.image_size
        grid = token_grid(cfg, size)
        check_writable(args.out)
        sources, labels, class_names = labelled_sources(args.data or "")
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"extract_codes.py: {e}")
    with distributed.session() as d:
        result = extract(model.to(d.device), sources, size, args.batch_size, d.device, not args.no_flip,
                         progress=d.main)
        if result is None:
            return None
        grids, owners, skipped = result
        meta = {"vocab_size": model.quantize.codebook_size, "grid": list(grid), "num_classes": len(class_names),
                "class_names": class_names, "image_size": size, "tokenizer_image_size": cfg.image_size,
                "flip": not args.no_flip,
                "tokenizer": str(Path(args.checkpoint).resolve()), "num_images": len(grids),
                "skipped": {**skipped.unreadable, **{f: f"smaller than {size} px" for f in skipped.too_small}},
                "upscaled": skipped.upscaled}
        row_labels = np.repeat(np.asarray(labels, dtype=np.int64)[owners], grids.shape[1])
        write_codes(args.out, grids.reshape(-1, grids.shape[-1]), row_labels, meta)
        for name, reason in skipped.unreadable.items():
            print(f"skipped unreadable {name}: {reason}", file=sys.stderr)
        if skipped.too_small:
            print(f"skipped {len(skipped.too_small)} images smaller than {size} px", file=sys.stderr)
        if skipped.upscaled:
            print(f"enlarged {len(skipped.upscaled)} images whose short side was below {size} px", file=sys.stderr)
        print(f"wrote {args.out}: {len(grids)} images{' and their mirrors' * meta['flip']} of {len(class_names)} "
              f"classes, {grid[0]}x{grid[1]} tokens of {meta['vocab_size']} codes at {size} px"
              f"{'' if size == cfg.image_size else f' (the tokenizer was trained at {cfg.image_size} px)'}, "
              f"{len(meta['skipped'])} skipped")
        return meta


if __name__ == "__main__":
    main()
