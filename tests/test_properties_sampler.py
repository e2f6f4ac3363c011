"""Property-based tests (hypothesis) of fullvq_rt.sample_logits, the generator's sampling step.

Hypothesis draws the parameters (shape, logit family, cfg_scale, temperature, top_k, top_p, seed,
step, a numpy seed); numpy makes the logits. Runs are derandomized, so CI tests the same cases.

The oracle follows the documented semantics (fullvq_rt/sampling.py): guided logits in float32
(uncond + float32(s) * (cond - uncond), one rounding per operation: replicated bit for bit here),
ranking by guided logit with ties to the lower index (exact), top-k, top-p as the shortest
ranking prefix holding top_p of the kept weight, and the inverse-CDF draw in token index order at
u = Philox4x32-10(seed, (step, row)) (sampler_reference.uniform_bits). The weights are the one
inexact part: the core's exp has relative error < 2e-7 (documented) of a scaled logit z = (g -
max) / t that it rounds three times (g - max, 1 / t, the product: relative 3u, so the weight moves
by 3u |z| relative), and weights of z < -126 ln 2 are 0. So every prefix mass or cumulative
weight of the core lies within E = sum of w_i (2e-7 + 4u |z_i|) of the float64 one; the oracle
accepts exactly the tokens some such perturbation could give, which almost always is one token.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fullvq_rt
from cpu_kernels import KERNEL_PARAMS
from sampler_reference import uniform_bits

U32 = 2.0**-24
EXP_RTOL = 2e-7               # the core's exp, documented in cpp/sampler.h
ZERO_BELOW = -126 * np.log(2)  # scaled logits below this get weight 0 in the core
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------------------
# The oracle


def guided32(logits: np.ndarray, cfg_scale: float) -> np.ndarray:
    """(B, V) float32 guided logits exactly as the core computes them; -inf in either half stays."""
    logits = np.asarray(logits, np.float32)
    if cfg_scale == 1.0:
        return logits.copy()
    cond, uncond = np.split(logits, 2)
    with np.errstate(invalid="ignore", over="ignore"):
        g = uncond + np.float32(cfg_scale) * (cond - uncond)
    g[np.isneginf(cond) | np.isneginf(uncond)] = -np.inf
    return g


def ranking(g: np.ndarray) -> np.ndarray:
    """Token indices by guided logit descending, equal logits (-0 == +0) lower index first."""
    return np.lexsort((np.arange(g.size), -g.astype(np.float64)))


def top_k_set(g: np.ndarray, top_k: int) -> np.ndarray:
    order = ranking(g)
    return order[:top_k] if 0 < top_k < g.size else order


def weights(g: np.ndarray, temperature: float):
    """float64 weights w (V,), their error bound err (V,) and the scaled logits z."""
    top = g.max()
    with np.errstate(invalid="ignore", over="ignore"):
        z = np.where(np.isneginf(g), -np.inf, (g.astype(np.float64) - top) / temperature)
    w = np.exp(z)
    err = w * (EXP_RTOL + 4 * U32 * np.abs(np.nan_to_num(z, neginf=0.0)))
    err = np.where(z <= ZERO_BELOW + 1, w, err)  # at the cut to 0, anything from 0 to w
    return w, err, z


def top_p_range(g: np.ndarray, temperature: float, top_k: int, top_p: float):
    """(order, n_lo, n_hi, w, err, z): the core's kept set is order[:n] for some n in [n_lo, n_hi]."""
    order = top_k_set(g, top_k)
    w, err, z = weights(g, temperature)
    if top_p >= 1.0:
        return order, len(order), len(order), w, err, z
    cum, cum_err = np.cumsum(w[order]), np.cumsum(err[order])
    total, total_err = cum[-1], cum_err[-1]
    slack = 1e-12 * total  # float64 sums in another order
    may = np.flatnonzero(cum + cum_err + slack >= top_p * (total - total_err))
    must = np.flatnonzero(cum - cum_err - slack >= top_p * (total + total_err))
    n_lo = int(may[0]) + 1 if may.size else len(order)
    n_hi = int(must[0]) + 1 if must.size else len(order)
    return order, n_lo, max(n_lo, n_hi), w, err, z


def drawable(g: np.ndarray, u: float, temperature: float, top_k: int, top_p: float) -> set[int]:
    """The tokens the core may draw for guided row g at uniform u (float32 weight rounding aside,
    exactly one token)."""
    order, n_lo, n_hi, w, err, z = top_p_range(g, temperature, top_k, top_p)
    allowed: set[int] = set()
    for n in range(n_lo, n_hi + 1) if n_hi - n_lo <= 64 else [n_hi]:
        kept = np.sort(order[:n])
        kw = w[kept]
        after = np.cumsum(kw)
        before = after - kw
        total = after[-1]
        tol = 2 * err[kept].sum() + 1e-12 * total
        target = u * total
        hit = (before - tol <= target) & (target < after + tol) & (z[kept] > ZERO_BELOW - 1)
        if n_hi - n_lo > 64:  # a long run of near-zero weights: only membership is checked
            hit = z[kept] > ZERO_BELOW - 1
        allowed.update(int(t) for t in kept[hit])
    return allowed


def uniforms(seed: int, step: int, rows: int) -> np.ndarray:
    return np.array([uniform_bits(seed, step, r) / 2.0**53 for r in range(rows)])


# ------------------------------------------------------------------------------------------------
# Cases


def logit_rows(rng, family: str, rows: int, v: int) -> np.ndarray:
    """float32 (rows, V) logits of one family; every row keeps at least one finite logit."""
    if family == "ties":  # few distinct values: many equal logits
        x = rng.integers(-3, 4, (rows, v)).astype(np.float32)
    elif family == "peaked":
        x = rng.standard_normal((rows, v)).astype(np.float32)
        x[np.arange(rows), rng.integers(0, v, rows)] += np.float32(rng.uniform(2, 12))
    elif family == "wide":  # most weights underflow
        x = rng.uniform(-60, 60, (rows, v)).astype(np.float32)
    else:
        x = (10.0 ** rng.uniform(-2, 1.5) * rng.standard_normal((rows, v))).astype(np.float32)
    if family == "masked" or rng.random() < 0.3:
        x[rng.random((rows, v)) < rng.uniform(0, 0.9)] = -np.inf
        x[np.arange(rows), rng.integers(0, v, rows)] = rng.standard_normal(rows)
    return x


FAMILIES = ["gaussian", "ties", "peaked", "wide", "masked"]


@st.composite
def sampling_cases(draw, max_v=3000, max_b=6):
    b, v = draw(st.integers(1, max_b)), draw(st.integers(1, max_v))
    family = draw(st.sampled_from(FAMILIES))
    cfg = draw(st.one_of(st.just(1.0), st.floats(0.0, 6.0)))
    params = dict(
        cfg_scale=cfg,
        temperature=draw(st.floats(-1.3, 1.3).map(lambda e: float(10.0**e))),
        top_k=draw(st.one_of(st.just(0), st.integers(1, v + 2))),
        top_p=draw(st.one_of(st.just(1.0), st.floats(1e-3, 1.0), st.sampled_from([0.25, 0.5, 0.75]))),
        seed=draw(st.integers(0, 2**64 - 1)),
        step=draw(st.integers(0, 2**64 - 1)),
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    logits = logit_rows(rng, family, b if cfg == 1.0 else 2 * b, v)
    if cfg != 1.0:  # every guided row keeps a token that neither half masks
        both = rng.integers(0, v, b)
        for half in (0, b):
            bad = np.isneginf(logits[half + np.arange(b), both])
            logits[half + np.arange(b)[bad], both[bad]] = 0.0
    return logits, params


# ------------------------------------------------------------------------------------------------
# The draws


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@settings(max_examples=150, **SETTINGS)
@given(case=sampling_cases())
def test_each_draw_is_the_inverse_cdf_of_the_filtered_distribution(case, kernel):
    logits, params = case
    tokens = fullvq_rt.sample_logits(logits, kernel=kernel, **params)
    g = guided32(logits, params["cfg_scale"])
    assert tokens.shape == (len(g),) and tokens.dtype == np.int32
    u = uniforms(params["seed"], params["step"], len(g))
    for b in range(len(g)):
        allowed = drawable(g[b], u[b], params["temperature"], params["top_k"], params["top_p"])
        assert int(tokens[b]) in allowed, (f"row {b}: drew {tokens[b]}, the filtered inverse CDF at u={u[b]} gives "
                                           f"{sorted(allowed)}")


@settings(max_examples=100, **SETTINGS)
@given(case=sampling_cases(max_v=400), copies=st.integers(1, 32), steps=st.integers(1, 4))
def test_a_token_outside_the_top_k_is_never_drawn(case, copies, steps):
    # Exact: the ranking is by float32 guided logits with ties to the lower index, no rounding
    # involved. Copies of the rows draw many times, so the draws reach the edge of the top k.
    logits, params = case
    top_k = params["top_k"] or 1 + logits.shape[1] // 3
    halves = np.split(logits, 1 if params["cfg_scale"] == 1.0 else 2)
    logits = np.concatenate([np.tile(h, (copies, 1)) for h in halves])
    g = guided32(logits, params["cfg_scale"])
    allowed = [set(top_k_set(row, top_k).tolist()) for row in g]
    for step in range(steps):
        tokens = fullvq_rt.sample_logits(logits, **dict(params, top_k=top_k, step=step))
        for b, token in enumerate(tokens):
            assert int(token) in allowed[b], f"step {step} row {b}: token {token} is not among the top {top_k}"


@settings(max_examples=100, **SETTINGS)
@given(case=sampling_cases(max_v=500), top_p=st.floats(1e-3, 0.999))
def test_the_top_p_set_is_the_smallest_prefix_that_reaches_p(case, top_p):
    # Never beyond the smallest prefix of the ranking that holds top_p of the weight (within the
    # weights' rounding), and never short of it: each draw is the inverse CDF over that prefix.
    logits, params = case
    params = dict(params, top_p=top_p, top_k=0)
    g = guided32(logits, params["cfg_scale"])
    tokens = fullvq_rt.sample_logits(logits, **params)
    u = uniforms(params["seed"], params["step"], len(g))
    for b in range(len(g)):
        order, _, n_hi, _, _, _ = top_p_range(g[b], params["temperature"], 0, top_p)
        assert int(tokens[b]) in set(order[:n_hi].tolist()), f"row {b}: token {tokens[b]} beyond the top-p prefix"
        assert int(tokens[b]) in drawable(g[b], u[b], params["temperature"], 0, top_p)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@settings(max_examples=60, **SETTINGS)
@given(case=sampling_cases(max_v=2000), threads=st.sampled_from([0, 1, 2, 3]))
def test_the_same_seed_and_step_give_the_same_tokens(case, threads, kernel):
    logits, params = case
    first = fullvq_rt.sample_logits(logits, **params)
    np.testing.assert_array_equal(fullvq_rt.sample_logits(logits, **params), first)
    np.testing.assert_array_equal(fullvq_rt.sample_logits(logits, num_threads=threads, kernel=kernel, **params), first)
    # a row's token depends on its own logits and row index only: a prefix of the batch draws the same
    b = len(first)
    keep = max(1, b // 2)
    rows = (np.r_[0:keep] if params["cfg_scale"] == 1.0 else np.r_[0:keep, b:b + keep])
    np.testing.assert_array_equal(fullvq_rt.sample_logits(logits[rows], **params), first[:keep])


@settings(max_examples=60, **SETTINGS)
@given(case=sampling_cases(max_v=2000), scale=st.floats(0.0, 6.0))
def test_cfg_1_is_no_guidance(case, scale):
    logits, params = case
    cond = logits[: len(logits) // 2] if params["cfg_scale"] != 1.0 else logits
    params = dict(params, cfg_scale=1.0)
    alone = fullvq_rt.sample_logits(cond, **params)
    # cfg 1: the rows are not paired; the conditional rows draw as they do alone
    uncond = np.where(np.isneginf(cond[::-1]), np.float32(0), cond[::-1])  # other rows, no -inf
    both = fullvq_rt.sample_logits(np.concatenate([cond, uncond]), **params)
    assert len(both) == 2 * len(cond)
    np.testing.assert_array_equal(both[: len(cond)], alone)
    # guidance of a row by itself (cond == uncond) is no guidance, at any scale
    itself = fullvq_rt.sample_logits(np.concatenate([cond, cond]), **dict(params, cfg_scale=scale))
    np.testing.assert_array_equal(itself[: len(cond)], alone)  # (scale 1: unpaired, twice as many rows)
    # and scale 0 samples the unconditional row (where the conditional one does not mask a token)
    masked_uncond = np.where(np.isneginf(cond), np.float32(-np.inf), uncond)
    unconditional = fullvq_rt.sample_logits(np.concatenate([cond, uncond]), **dict(params, cfg_scale=0.0))
    np.testing.assert_array_equal(unconditional, fullvq_rt.sample_logits(masked_uncond, **params))


@settings(max_examples=60, **SETTINGS)
@given(case=sampling_cases(max_v=2000), smaller=st.floats(2.0, 36.0), top_k_1=st.booleans())
def test_temperature_to_zero_gives_the_argmax(case, smaller, top_k_1):
    logits, params = case
    g = guided32(logits, params["cfg_scale"])
    top = g.max(1, keepdims=True)
    below = np.where(g < top, top.astype(np.float64) - g, np.inf).min()  # smallest gap under a row's maximum
    assume(np.isfinite(below) and below > 0)
    # every non-maximal weight underflows to 0 once gap / t is past 126 ln 2 (about 87)
    temperature = float(below) * 10.0**-smaller
    params = dict(params, temperature=temperature, top_k=1 if top_k_1 else params["top_k"])
    tokens = fullvq_rt.sample_logits(logits, **params)
    for b, token in enumerate(tokens):
        maxima = np.flatnonzero(g[b] == top[b])
        if top_k_1 or len(maxima) == 1:
            assert token == maxima[0], f"row {b}: {token}, the argmax is {maxima[0]}"
        else:
            assert token in maxima, f"row {b}: {token} is not one of the tied maxima {maxima}"


# ------------------------------------------------------------------------------------------------
# Layouts, dtypes and bad values


@settings(max_examples=40, **SETTINGS)
@given(case=sampling_cases(max_v=500), row_step=st.integers(2, 3), pad=st.integers(0, 5),
       dtype=st.sampled_from([np.float16, np.float64, np.dtype(">f4")]))
def test_layouts_and_dtypes(case, row_step, pad, dtype):
    logits, params = case
    want = fullvq_rt.sample_logits(logits, **params)
    # rows further apart (contiguous columns): the same tokens; the gaps hold NaN, never read
    r, v = logits.shape
    buf = np.full((r * row_step, v + pad), np.nan, np.float32)
    buf[::row_step, :v] = logits
    np.testing.assert_array_equal(fullvq_rt.sample_logits(buf[::row_step, :v], **params), want)
    # other float dtypes are converted to float32: the tokens of the converted array
    converted = logits.astype(dtype)
    np.testing.assert_array_equal(fullvq_rt.sample_logits(converted, **params),
                                  fullvq_rt.sample_logits(converted.astype(np.float32), **params))
    # strided columns are refused (the API's documented limit), not read wrongly
    if v > 1:
        wide = np.repeat(logits, 2, axis=1)
        with pytest.raises(ValueError, match="logits columns must be contiguous"):
            fullvq_rt.sample_logits(wide[:, ::2], **params)
    if r > 1 and v > 1:  # a transposed view: columns r apart
        with pytest.raises(ValueError, match="logits columns must be contiguous"):
            fullvq_rt.sample_logits(np.ascontiguousarray(logits.T).T, **params)


@settings(max_examples=40, **SETTINGS)
@given(case=sampling_cases(max_v=300), value=st.sampled_from([np.nan, np.inf]), seed=st.integers(0, 2**32 - 1))
def test_nan_and_plus_inf_are_refused_naming_the_row(case, value, seed):
    logits, params = case
    rng = np.random.default_rng(seed)
    row, col = int(rng.integers(0, len(logits))), int(rng.integers(0, logits.shape[1]))
    logits = logits.copy()
    logits[row, col] = value
    words = "contains NaN" if np.isnan(value) else r"contains \+inf"
    with pytest.raises(ValueError, match=rf"logits row {row} {words}"):
        fullvq_rt.sample_logits(logits, **params)
