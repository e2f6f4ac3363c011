"""One sampling step (CFG, temperature, top-k, top-p, draw) on the CPU: fullvq_rt against numpy.

    python bench/sampler.py [--repeats N] [--json OUT]

For each vocabulary V, batch B (with classifier-free guidance, so 2B logit rows) and parameter
set: median wall time of fullvq_rt.sample_logits and of a vectorised numpy implementation of the
same semantics (guided logits, stable sort for the ranking, cumulative sums for top-p and the
inverse-CDF draw in token order, fed the same Philox uniforms), side by side in one process, and
whether the two drew the same tokens. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import fullvq_rt

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from lookup import cpu_model, measure  # noqa: E402
from sampler_reference import uniform_bits  # noqa: E402

VOCABS = (16384, 262144)
BATCHES = (1, 8, 32)
CFG_SCALE, SEED, STEP = 4.0, 0, 1
PARAMS = {
    "plain": dict(),
    "top_k=2000": dict(top_k=2000),
    "top_p=0.95": dict(top_p=0.95),
    "top_k=2000, top_p=0.95": dict(top_k=2000, top_p=0.95),
}


def numpy_sample(logits: np.ndarray, u: np.ndarray, cfg_scale: float, top_k: int = 0, top_p: float = 1.0,
                 temperature: float = 1.0) -> np.ndarray:
    """logits (2B, V) float32, u (B,) uniforms -> tokens (B,) int64, with sample_logits' semantics."""
    cond, uncond = np.split(logits, 2)
    g = uncond + np.float32(cfg_scale) * (cond - uncond)
    g[np.isneginf(cond) | np.isneginf(uncond)] = -np.inf
    w = np.exp((g - g.max(1, keepdims=True)) / np.float32(temperature))
    if top_k or top_p < 1.0:
        order = np.argsort(-g, axis=1, kind="stable")  # ranking: logit descending, lower index first
        if 0 < top_k < g.shape[1]:
            order = order[:, :top_k]
        ranked = np.take_along_axis(w, order, 1)
        if top_p < 1.0:
            cum = np.cumsum(ranked, 1, dtype=np.float64)
            ranked = np.where(cum - ranked < top_p * cum[:, -1:], ranked, 0)  # shortest prefix reaching top_p
        w = np.zeros_like(w)
        np.put_along_axis(w, order, ranked, 1)
    cum = np.cumsum(w, 1, dtype=np.float64)
    return (cum <= (u * cum[:, -1])[:, None]).sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()

    print(f"CPU: {cpu_model()}, numpy {np.__version__}; cfg_scale {CFG_SCALE}, temperature 1\n")
    print("| V | B | parameters | fullvq_rt ms | numpy ms | speed-up | same tokens |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    rows = []
    rng = np.random.default_rng(0)
    for v in VOCABS:
        for batch in BATCHES:
            logits = (2 * rng.standard_normal((2 * batch, v))).astype(np.float32)
            u = np.array([uniform_bits(SEED, STEP, b) / 2**53 for b in range(batch)])
            for name, params in PARAMS.items():
                ours = lambda: fullvq_rt.sample_logits(logits, cfg_scale=CFG_SCALE, seed=SEED, step=STEP, **params)
                theirs = lambda: numpy_sample(logits, u, CFG_SCALE, **params)
                ours_s, _ = measure(ours, args.repeats)
                theirs_s, _ = measure(theirs, args.repeats)
                same = float(np.mean(ours() == theirs()))
                rows.append(dict(v=v, batch=batch, params=name, fullvq_rt_ms=ours_s * 1e3, numpy_ms=theirs_s * 1e3,
                                 same_tokens=same))
                print(f"| {v} | {batch} | {name} | {ours_s * 1e3:.2f} | {theirs_s * 1e3:.1f} | "
                      f"{theirs_s / ours_s:.0f}x | {same:.0%} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(cpu=cpu_model(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
