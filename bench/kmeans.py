"""VQGAN-LC's codebook k-means on a CPU: two-level against flat Lloyd's, side by side.

    python bench/kmeans.py [--sizes 4096,16384,262144] [--features-per-code 4] [--iters 10]
        [--flat-max-flop 5e13] [--json OUT]

For each K: EfficientNet-Lite0 patch features of random crops of the photos that ship in pip
packages (as the study's lc runs build them: 4 per code), then k-means by both methods. Prints the
wall time of each and the quantisation error (mean squared distance to the nearest centre) of
two-level relative to flat. Flat runs only up to --flat-max-flop; beyond, its time is estimated
from the FLOP rate flat reached at the largest K it ran.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from fullvq.data import default_photos
from fullvq.lc_codebook import (FLAT_KMEANS_MAX_CPU_FLOP, extract_patch_features, flat_kmeans_flop, kmeans,
                                load_feature_encoder, two_level_kmeans)
from fullvq.lookup import nearest_codes

sys.path.insert(0, str(Path(__file__).parent))
from lookup import cpu_model  # noqa: E402


def mean_sq_error(x: torch.Tensor, centres: torch.Tensor) -> float:
    """Mean over features of the squared distance to the nearest centre."""
    error = 0.0
    for rows in x.split(1 << 16):
        error += float(((rows - centres[nearest_codes(rows, centres)]).double() ** 2).sum())
    return error / len(x)


def timed(fn, *args, **kwargs):
    """fn(*args, **kwargs) and the seconds it took."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="4096,16384,262144")
    p.add_argument("--features-per-code", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--flat-max-flop", type=float, default=FLAT_KMEANS_MAX_CPU_FLOP)
    p.add_argument("--json")
    args = p.parse_args()
    encoder = load_feature_encoder("efficientnet-lite0")
    photos = default_photos()
    per_crop = math.ceil(encoder.input_size / encoder.stride) ** 2
    rows, flop_rate = [], None
    print(f"# k-means, EfficientNet-Lite0 features ({encoder.dim}-d) of the shipped photos, {args.iters} iterations, "
          f"{torch.get_num_threads()} threads, {cpu_model()}, torch {torch.__version__}\n")
    print("| K | features | flat | two-level | speed-up | two-level error / flat |")
    print("|---:|---:|---:|---:|---:|---:|")
    for k in map(int, args.sizes.split(",")):
        crops = math.ceil(args.features_per_code * k / (len(photos) * per_crop))
        x = extract_patch_features(encoder, photos, crops_per_image=crops)
        flop = flat_kmeans_flop(len(x), k, x.shape[1], args.iters)
        two_level, two_level_s = timed(two_level_kmeans, x, k, iters=args.iters)
        row = {"k": k, "features": len(x), "two_level_s": two_level_s, "flat_flop": flop,
               "two_level_error": mean_sq_error(x, two_level)}
        if flop <= args.flat_max_flop:
            flat, row["flat_s"] = timed(kmeans, x, k, iters=args.iters)
            row["flat_error"], flop_rate = mean_sq_error(x, flat), flop / row["flat_s"]
            flat_text, ratio = f"{row['flat_s']:.1f} s", f"{row['two_level_error'] / row['flat_error']:.4f}"
        else:
            row["flat_s_estimated"] = flop / flop_rate if flop_rate else None
            flat_text = (f"not run: {flop:.0e} FLOP, about {row['flat_s_estimated'] / 60:.0f} min" if flop_rate
                         else f"not run: {flop:.0e} FLOP")
            ratio = "n/a"
        flat_s = row.get("flat_s", row.get("flat_s_estimated"))
        speedup = f"{flat_s / two_level_s:.0f}x" if flat_s else "n/a"
        print(f"| {k} | {len(x)} | {flat_text} | {two_level_s:.1f} s | {speedup} | {ratio} |", flush=True)
        rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
