"""Would an exact kd-tree beat the brute-force lookup for the study's 8-dimensional codes?

    python bench/lookup_kdtree.py [--codebook-size 262144] [--crops 512] [--ckpt RUN/ckpt.pt]

scipy's cKDTree (exact, float64, rebuilt per call as training would: the codes change every step)
against fullvq_rt.nearest, both on one thread, side by side on the same latents: an untrained tiny
model's, Gaussian codes and queries, and with --ckpt a trained run's (its baked codebook, its
encoder on held-out tiles). Prints a Markdown table: the tree's build and query time, the brute
force's, their ratio, and how often the two pick the same code (they differ on float32 near-ties).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.spatial import cKDTree

import fullvq_rt
from fullvq import checkpoint
from fullvq.config import preset
from fullvq.data import heldout_tiles, load_sources
from fullvq.models import build_model


def latents_and_codes(model, tiles: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(M, D) encoder latents of `tiles` and the (K, D) baked codebook, float32."""
    with torch.no_grad():
        z = model.quant_conv(model.encoder(tiles))
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).numpy().copy(), model.quantize.bake().numpy()


def seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def compare(name: str, queries: np.ndarray, codes: np.ndarray) -> str:
    build, tree = seconds(lambda: cKDTree(codes, leafsize=16, balanced_tree=False, compact_nodes=False))
    query, (_, tree_idx) = seconds(lambda: tree.query(queries, k=1, workers=1))
    brute, brute_idx = seconds(lambda: fullvq_rt.nearest(queries, codes, "l2", num_threads=1))
    return (f"| {name} | {len(queries)} | {len(codes)} | {build:.2f} s | {query:.2f} s | {brute:.2f} s | "
            f"{(build + query) / brute:.2f}x | {np.mean(tree_idx == brute_idx):.4%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--codebook-size", type=int, default=262144)
    p.add_argument("--crops", type=int, default=512, help="held-out tiles encoded per case (64 latents each)")
    p.add_argument("--ckpt", help="a trained run of the tiny preset at --codebook-size")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = preset("tiny")
    cfg.quantizer.name, cfg.quantizer.codebook_size = "bridge", args.codebook_size
    tiles = heldout_tiles(load_sources(cfg.data), cfg.image_size)[:args.crops]
    rng = np.random.default_rng(0)
    gauss_codes = rng.standard_normal((args.codebook_size, cfg.quantizer.codebook_dim), dtype=np.float32)
    rows = [compare("untrained bridge", *latents_and_codes(build_model(cfg).eval(), tiles)),
            compare("Gaussian", rng.standard_normal((len(tiles) * 64, gauss_codes.shape[1]), dtype=np.float32),
                    gauss_codes)]
    if args.ckpt:
        rows.append(compare(f"trained ({args.ckpt})", *latents_and_codes(checkpoint.load_model(args.ckpt)[0], tiles)))
    print("| codes and latents | M | K | kd-tree build | kd-tree query | fullvq_rt.nearest | kd-tree / brute | "
          "same code |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
