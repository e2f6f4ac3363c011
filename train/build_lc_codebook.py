"""Build a VQGAN-LC codebook: k-means centres of pretrained patch features, saved for the lc quantizer.

    python train/build_lc_codebook.py --codebook-size 16384                 # default photos, offline
    python train/build_lc_codebook.py --codebook-size 100000 --data /imagenet/train --crops-per-image 4
    python train/build_lc_codebook.py --codebook-size 262144 --crops-per-image 200 --kmeans two-level  # CPU

Writes a file for torch.load(path, weights_only=True): {"codebook": (K, C) float32, "encoder",
"feature_dim", "num_features", "format", "version"} (see fullvq.lc_codebook).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fullvq without an install, from any directory

from fullvq.lc_codebook import KMEANS_METHODS, build_lc_codebook  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codebook-size", "-k", type=int, required=True, help="number of codes K")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder of images, searched recursively (default: photos shipped in pip packages)")
    parser.add_argument("--out", type=Path, default=None, help="output file (default: runs/lc/codebook-K.pt)")
    parser.add_argument("--encoder", default="auto",
                        help="'auto', 'efficientnet-lite0', 'open_clip:MODEL[/PRETRAINED]' or 'timm:MODEL'")
    parser.add_argument("--crops-per-image", type=int, default=32, help="random crops per image (default 32)")
    parser.add_argument("--crop-size", type=int, default=None,
                        help="crop side in pixels (default: the encoder's input size)")
    parser.add_argument("--iters", type=int, default=20, help="k-means iterations (default 20)")
    parser.add_argument("--init", choices=("random", "k-means++"), default="random", help="k-means seeding")
    parser.add_argument("--kmeans", choices=KMEANS_METHODS, default="auto",
                        help="flat Lloyd's, or two-level (sqrt(K) coarse clusters, then centres within each: "
                             "minutes on a CPU at 262,144 codes); auto: flat on a GPU or when its cost fits a "
                             "CPU's few minutes, else two-level (default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    out = args.out or Path("runs/lc") / f"codebook-{args.codebook_size}.pt"
    start = time.perf_counter()
    try:
        saved = build_lc_codebook(
            args.data, args.codebook_size, out, encoder=args.encoder, crops_per_image=args.crops_per_image,
            crop_size=args.crop_size, iters=args.iters, seed=args.seed, init=args.init, device=args.device,
            progress=True, method=args.kmeans)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}: K={saved['codebook'].shape[0]} codes x C={saved['feature_dim']} from "
          f"N={saved['num_features']} patch features ({saved['kmeans']} k-means), encoder {saved['encoder']}, "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
