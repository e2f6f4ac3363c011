"""Independent references for the sampler tests: Philox4x32-10 in Python integers, the exact
filtered distribution in float64 numpy, and a chi-square check of draws against it."""

from __future__ import annotations

import numpy as np

MASK32 = 0xFFFFFFFF

# Random123's tests/kat_vectors, "philox4x32 10" lines: counter (4 words), key (2 words), result.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox4x32_10(counter: tuple[int, ...], key: tuple[int, int]) -> tuple[int, ...]:
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & MASK32
        k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def uniform_bits(seed: int, step: int, row: int) -> int:
    """The 53 bits of the sampler's uniform for (seed, step, row): u = bits / 2**53."""
    r = philox4x32_10((step & MASK32, step >> 32, row & MASK32, row >> 32), (seed & MASK32, seed >> 32))
    return (r[0] << 21) | (r[1] >> 11)


def guided(logits: np.ndarray, cfg_scale: float) -> np.ndarray:
    """(B, V) float64 guided logits; -inf in either half stays -inf."""
    x = logits.astype(np.float64)
    if cfg_scale == 1.0:
        return x
    cond, uncond = np.split(x, 2)
    with np.errstate(invalid="ignore"):
        g = uncond + cfg_scale * (cond - uncond)
    g[np.isneginf(cond) | np.isneginf(uncond)] = -np.inf
    return g


def kept_tokens(g: np.ndarray, temperature: float, top_k: int, top_p: float) -> list[np.ndarray]:
    """Per row, the kept token indices in ranking order (logit descending, lower index first)."""
    kept = []
    for row in g:
        order = np.lexsort((np.arange(row.size), -row))
        if 0 < top_k < row.size:
            order = order[:top_k]
        if top_p < 1.0:
            w = np.exp((row[order] - row.max()) / temperature)
            cum = np.cumsum(w) / w.sum()
            order = order[: int(np.searchsorted(cum, top_p)) + 1]
        kept.append(order)
    return kept


def filtered_probs(logits: np.ndarray, *, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0) -> np.ndarray:
    """The exact sampling distribution (B, V) float64."""
    g = guided(logits, cfg_scale)
    probs = np.zeros_like(g)
    for b, order in enumerate(kept_tokens(g, temperature, top_k, top_p)):
        w = np.exp((g[b, order] - g[b].max()) / temperature)
        probs[b, order] = w / w.sum()
    return probs


def chi_square_pvalue(tokens: np.ndarray, probs: np.ndarray) -> float:
    """p-value of draws `tokens` from the distribution `probs` (V,): bins with fewer than 5 expected
    draws are pooled; any draw of a token with probability 0 gives 0."""
    from scipy.stats import chisquare
    counts = np.bincount(tokens, minlength=probs.size).astype(np.float64)
    if counts[probs == 0].any():
        return 0.0
    expected = probs * tokens.size
    small = (expected < 5) & (probs > 0)
    big = expected >= 5
    f_obs = np.append(counts[big], counts[small].sum())
    f_exp = np.append(expected[big], expected[small].sum())
    if not small.any():
        f_obs, f_exp = f_obs[:-1], f_exp[:-1]
    if f_obs.size < 2:
        return 1.0
    f_exp *= f_obs.sum() / f_exp.sum()  # remove float64 rounding of the total
    return float(chisquare(f_obs, f_exp).pvalue)
