"""Float64 reference for the nearest-code lookup and the correctness criterion the tests apply.

Criterion: the chosen code's float64 distance equals the true minimum within 1e-5 relative, plus
the float32 rounding of the distance expansion (1e-6 of |x - mu|^2 + |c - mu|^2, mu = codebook
mean); where the runner-up is farther than that tolerance, the index must be exact.
"""

from __future__ import annotations

import numpy as np

RTOL = 1e-5
ROUNDING = 1e-6


def _normalised(a: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return np.divide(a, norms, out=np.zeros_like(a), where=norms > 0)


def distances(x: np.ndarray, codes: np.ndarray, metric: str) -> np.ndarray:
    """x (M, D), codes (K, D) -> (M, K) float64 squared-l2 or (1 - cos) distances."""
    x, codes = x.astype(np.float64), codes.astype(np.float64)
    if metric == "cosine":
        return 1.0 - _normalised(x) @ _normalised(codes).T
    mean = codes.mean(0)
    x, codes = x - mean, codes - mean
    return np.maximum(0.0, (x**2).sum(1)[:, None] - 2.0 * x @ codes.T + (codes**2).sum(1)[None])


def _scale(x: np.ndarray, codes: np.ndarray, nearest: np.ndarray, metric: str) -> np.ndarray:
    """Magnitude the float32 expansion rounds at, per row."""
    if metric == "cosine":
        return np.full(len(x), 2.0)
    mean = codes.astype(np.float64).mean(0)
    xs = ((x.astype(np.float64) - mean) ** 2).sum(1)
    cs = ((codes[nearest].astype(np.float64) - mean) ** 2).sum(1)
    return xs + cs


def assert_nearest(x, codes, indices, metric="l2", returned_distances=None, chunk=4096):
    """Checks indices (M,) against the float64 reference, chunk rows at a time."""
    x, codes = np.asarray(x), np.asarray(codes)
    indices = np.asarray(indices)
    assert indices.shape == (len(x),) and indices.dtype == np.int32
    for start in range(0, len(x), chunk):
        rows = slice(start, start + chunk)
        d = distances(x[rows], codes, metric)
        order = np.argsort(d, axis=1, kind="stable")[:, :2]
        best = d[np.arange(len(d)), order[:, 0]]
        tol = RTOL * best + ROUNDING * _scale(x[rows], codes, order[:, 0], metric)
        chosen = d[np.arange(len(d)), indices[rows]]
        bad = np.flatnonzero(chosen - best > tol)
        assert bad.size == 0, f"rows {bad[:5] + start}: distance {chosen[bad[:5]]} vs minimum {best[bad[:5]]}"
        if codes.shape[0] > 1:
            second = d[np.arange(len(d)), order[:, 1]]
            clear = second - best > tol
            wrong = np.flatnonzero(clear & (indices[rows] != order[:, 0]))
            assert wrong.size == 0, f"rows {wrong[:5] + start}: index {indices[rows][wrong[:5]]} vs {order[wrong[:5], 0]}"
        if returned_distances is not None:
            off = np.abs(np.asarray(returned_distances)[rows] - chosen) - (tol + RTOL * chosen)
            assert np.all(off <= 0), f"distances off by {off.max()} beyond tolerance"

