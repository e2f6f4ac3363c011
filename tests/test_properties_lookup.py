"""Property-based tests (hypothesis) of fullvq_rt.nearest / fullvq_rt.Codebook and _core.gather_nchw.

Hypothesis draws the parameters of each case (shapes, layouts, dtypes, metric, kernel, magnitude,
data family, a numpy seed); numpy makes the arrays from them, which keeps the examples cheap and
their shrinking meaningful. Runs are derandomized, so CI tests the same cases every time.

The criterion, rounding-derived (not measured on this machine): the core scores code k as
s_k = bias_k + sum_j x'_j c'_kj in float32, where for l2 x' = -2 fl(x - mu), c' = fl(c - mu), bias =
fl(|c'|^2) (mu the codebook mean rounded to float32), and for cosine x' = -fl(x/|x|), c' =
fl(c/|c|), bias = 0. A chain of D multiply-adds (fused or not: at most 2D + 2 roundings, whatever
the SIMD width, thread split or instruction set) is off its exact value by at most
gamma(2D + 2) * (|bias| + sum_j |x'_j c'_kj|), gamma(n) = n u / (1 - n u), u = 2**-24; the rounded
inputs add 4u of the same sum. With |bias| + sum |x'_j c'_kj| <= 2 S_k, S_k = |x - mu|^2 + |c_k -
mu|^2 (l2) or 1 (cosine), each score is within e_k = (gamma(2D + 2) + 4u) 2 S_k (+ an underflow
term of 2**-149 per operation) of the truth. So a chosen code i may differ from the float64 argmin
j only if d_i - d_j <= e_i + e_j: a float32 tie. Bitwise-equal codes get bitwise-equal scores, so
among duplicates the lowest index must win exactly.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fullvq_rt
from cpu_kernels import KERNEL_PARAMS
from fullvq_rt import _core

METRICS = ["l2", "cosine"]
U32 = 2.0**-24      # float32 unit roundoff
U64 = 2.0**-53
ETA32 = 2.0**-149   # float32 underflow: absolute error of one operation on subnormals
MAX_SQUARED_NORM = 1e37  # the core's documented limit ("squared norm ... > 1e37 ... rescale")

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


# ------------------------------------------------------------------------------------------------
# The float64 reference and the float32-tie criterion


def _normalised(a: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return np.divide(a, norms, out=np.zeros_like(a), where=norms > 0)


def reference(x: np.ndarray, codes: np.ndarray, metric: str):
    """float64 distances (M, K) and the scale S (M, K) at which the float32 core rounds them."""
    x64, c64 = np.asarray(x, np.float32).astype(np.float64), np.asarray(codes, np.float32).astype(np.float64)
    if metric == "cosine":
        dist = 1.0 - _normalised(x64) @ _normalised(c64).T
        return dist, np.ones_like(dist)
    mu = c64.mean(0).astype(np.float32).astype(np.float64)  # the core centres on float32(mean)
    xc, cc = x64 - mu, c64 - mu
    xs, cs = (xc**2).sum(1), (cc**2).sum(1)
    return np.maximum(0.0, xs[:, None] - 2.0 * xc @ cc.T + cs[None]), xs[:, None] + cs[None]


def score_error(scale: np.ndarray, d: int) -> np.ndarray:
    """Bound on |float32 score - exact| (see the module doc) plus the float64 reference's own
    rounding (the expansion above: a few ulps of S)."""
    return (gamma(2 * d + 2) + 4 * U32) * 2.0 * scale + (4 * d + 8) * ETA32 + 8 * (d + 2) * U64 * scale


def first_copies(codes: np.ndarray) -> np.ndarray:
    """(K,) index of the first code bitwise equal to each code."""
    rows = np.ascontiguousarray(codes, np.float32).view(np.uint32)
    _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)]


def assert_float32_argmin(x, codes, indices, metric, distances=None):
    """indices (M,) int32 are the float64 argmin of each row of x up to float32 ties, the lowest
    among duplicate codes; distances (if given) are the chosen codes' within the same rounding."""
    x, codes = np.asarray(x, np.float32), np.asarray(codes, np.float32)
    indices = np.asarray(indices)
    assert indices.shape == (len(x),) and indices.dtype == np.int32, (indices.shape, indices.dtype)
    if len(x) == 0:
        return
    assert indices.min() >= 0 and indices.max() < len(codes), indices
    dist, scale = reference(x, codes, metric)
    error = score_error(scale, x.shape[1])
    rows = np.arange(len(x))
    best = dist.argmin(1)
    gap = dist[rows, indices] - dist[rows, best]
    allowed = error[rows, indices] + error[rows, best]
    bad = np.flatnonzero(gap > allowed)
    assert bad.size == 0, (f"{metric}: rows {bad[:5]} chose {indices[bad[:5]]} at distance "
                           f"{dist[bad[:5], indices[bad[:5]]]}"
                           f", the float64 minimum is {dist[bad[:5], best[bad[:5]]]} at {best[bad[:5]]} (allowed "
                           f"float32 tie {allowed[bad[:5]]})")
    first = first_copies(codes)
    not_first = np.flatnonzero(first[indices] != indices)
    assert not_first.size == 0, (f"rows {not_first[:5]} chose codes {indices[not_first[:5]]}, but the same code "
                                 f"comes first at {first[indices[not_first[:5]]]}")
    if distances is not None:
        # returned = max(0, fl(offset + score)), offset = fl(|x'|^2) (l2) or 1 (cosine): two more roundings
        distances = np.asarray(distances)
        assert distances.shape == (len(x),) and distances.dtype == np.float32
        chosen = dist[rows, indices]
        off = np.abs(distances.astype(np.float64) - chosen)
        limit = error[rows, indices] + 2 * U32 * (scale[rows, indices] + chosen)
        assert np.all(off <= limit), f"distances {distances[off > limit][:5]} vs float64 {chosen[off > limit][:5]}"


# ------------------------------------------------------------------------------------------------
# Cases: the data families, memory layouts and dtypes the API takes


def family_data(rng, family: str, m: int, k: int, d: int):
    """float64 (x (M, D), codes (K, D)) of one data family, magnitudes around 1."""
    if family == "grid":  # small integers: many exact ties in exact arithmetic
        return rng.integers(-2, 3, (m, d)).astype(np.float64), rng.integers(-2, 3, (k, d)).astype(np.float64)
    if family == "duplicates":  # few distinct codes, copies spread over the codebook
        base = rng.standard_normal((max(1, k // 4), d))
        codes = base[rng.integers(0, len(base), k)]
        return codes[rng.integers(0, k, m)] + 0.01 * rng.standard_normal((m, d)), codes
    codes = rng.standard_normal((k, d))
    if family == "near":  # queries at or next to codes
        eps = rng.choice([0.0, 1e-4, 1e-2])
        x = codes[rng.integers(0, k, m)] + eps * rng.standard_normal((m, d))
    else:
        x = rng.standard_normal((m, d))
    if family == "offset":  # far from the origin: a shared offset much larger than the spread
        offset = 10.0 ** rng.uniform(1, 5) * (1 + rng.standard_normal(d))
        x, codes = x + offset, codes + offset
    return x, codes


def laid_out(a: np.ndarray, layout: str, step: int) -> np.ndarray:
    """A view with the values of a (N, D) in another memory layout; the gaps of strided buffers
    hold NaN, so a core that read them would refuse the input rather than pass by chance."""
    n, d = a.shape
    if layout == "c":
        return np.ascontiguousarray(a)
    if layout == "fortran":
        return np.asfortranarray(a)
    if layout == "row_step":
        buf = np.full((n * step, d), np.nan, a.dtype)
        buf[::step] = a
        return buf[::step]
    if layout == "column_step":
        buf = np.full((n, d * step), np.nan, a.dtype)
        buf[:, ::step] = a
        return buf[:, ::step]
    if layout == "negative":
        return np.ascontiguousarray(a[::-1, ::-1])[::-1, ::-1]
    if layout == "transposed_step":  # the transpose of a row-strided (D, N) buffer
        buf = np.full((d * step, n), np.nan, a.dtype)
        buf[::step] = a.T
        return buf[::step].T
    raise AssertionError(layout)


LAYOUTS = ["c", "fortran", "row_step", "column_step", "negative", "transposed_step"]
FAMILIES = ["gaussian", "near", "offset", "grid", "duplicates"]


def sizes(max_m=40, max_k=300, max_d=70):
    return st.tuples(st.integers(0, max_m), st.integers(1, max_k), st.integers(1, max_d))


def norm_problem(x: np.ndarray, codes: np.ndarray):
    """The ValueError the core must raise for x and codes (float32), or None: the first row of
    the codebook, then of x, holding NaN/Inf or a squared norm over the limit."""
    for name, a in (("codebook", codes), ("x", x)):
        with np.errstate(over="ignore", invalid="ignore"):
            sq = (a.astype(np.float64) ** 2).sum(1)
        assume(not np.any(np.abs(sq - MAX_SQUARED_NORM) < 1e-6 * MAX_SQUARED_NORM))  # no coin flips at the limit
        bad = np.flatnonzero(~(sq <= MAX_SQUARED_NORM))
        if bad.size:
            row = bad[0]
            words = "contains NaN or Inf" if not np.isfinite(sq[row]) else "has squared norm"
            return f"{name} row {row} {words}"
    return None


# ------------------------------------------------------------------------------------------------
# nearest / Codebook against the float64 reference


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@settings(max_examples=120, **SETTINGS)
@given(size=sizes(), metric=st.sampled_from(METRICS), family=st.sampled_from(FAMILIES),
       x_layout=st.sampled_from(LAYOUTS), c_layout=st.sampled_from(LAYOUTS),
       step=st.integers(2, 3), magnitude=st.floats(0, 1), seed=st.integers(0, 2**32 - 1))
def test_nearest_is_the_float64_argmin_up_to_float32_ties(size, metric, kernel, family, x_layout, c_layout, step,
                                                          magnitude, seed):
    m, k, d = size
    # 10**exponent: cosine 1e-30 .. 1e30; l2 from 1e-15 (below, l2 scores underflow float32: see the
    # xfail test below) to past the 1e37 squared-norm limit, where the core must refuse
    low, high = (-30, 30) if metric == "cosine" else (-15, 19)
    exponent = low + magnitude * (high - low)
    rng = np.random.default_rng(seed)
    x64, c64 = family_data(rng, family, m, k, d)
    x32, c32 = (x64 * 10.0**exponent).astype(np.float32), (c64 * 10.0**exponent).astype(np.float32)
    assume(np.isfinite(x32).all() and np.isfinite(c32).all())
    x, codes = laid_out(x32, x_layout, step), laid_out(c32, c_layout, step)

    problem = norm_problem(x32, c32)
    if problem is not None:
        with pytest.raises(ValueError, match=re.escape(problem)):
            fullvq_rt.nearest(x, codes, metric, kernel=kernel)
        return

    indices, dist = fullvq_rt.nearest(x, codes, metric, return_distances=True, kernel=kernel)
    assert_float32_argmin(x32, c32, indices, metric, dist)
    # the same arithmetic whatever the layout, path or thread count: identical results
    book = fullvq_rt.Codebook(codes, metric, kernel=kernel)
    for threads in (None, 1, 3):
        got, got_dist = book.nearest(x, return_distances=True, num_threads=threads)
        np.testing.assert_array_equal(got, indices)
        np.testing.assert_array_equal(got_dist, dist)
    np.testing.assert_array_equal(fullvq_rt.nearest(x32, c32, metric, kernel=kernel), indices)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@settings(max_examples=10, **SETTINGS)
@given(metric=st.sampled_from(METRICS), split=st.sampled_from(["codes", "rows"]),
       distinct=st.integers(1, 400), seed=st.integers(0, 2**32 - 1))
def test_any_thread_count_gives_the_same_codes_and_duplicates_go_to_the_lowest_index(metric, kernel, split,
                                                                                     distinct, seed):
    # Big enough for the core to start several threads (>= 4M multiply-adds per thread), split over
    # codes (many codes: per-thread ranges merged in code order) or over rows (few codes).
    rng = np.random.default_rng(seed)
    m, k, d = (300, 4096, 16) if split == "codes" else (12000, 64, 16)
    base = rng.standard_normal((min(distinct, k), d)).astype(np.float32)
    codes = base[rng.integers(0, len(base), k)]  # copies of each code all over the codebook
    x = codes[rng.integers(0, k, m)] + np.float32(0.05) * rng.standard_normal((m, d)).astype(np.float32)
    book = fullvq_rt.Codebook(codes, metric, kernel=kernel)
    expected = book.nearest(x, num_threads=1)
    for threads in (2, 3, 4, None):
        np.testing.assert_array_equal(book.nearest(x, num_threads=threads), expected)
        np.testing.assert_array_equal(fullvq_rt.nearest(x, codes, metric, num_threads=threads, kernel=kernel),
                                      expected)
    assert_float32_argmin(x, codes, expected, metric)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@settings(max_examples=40, **SETTINGS)
@given(size=sizes(max_m=20, max_k=100, max_d=40), metric=st.sampled_from(METRICS), power=st.integers(-20, 40),
       seed=st.integers(0, 2**32 - 1))
def test_scaling_both_sides_by_a_power_of_two_changes_nothing(size, metric, kernel, power, seed):
    # Exact in float32 while every intermediate stays a normal number: the same codes, and
    # distances scaled by exactly 4**power (l2) or unchanged (cosine).
    m, k, d = size
    if metric == "cosine":
        power = power * 5 // 2 - 50  # [-100, 50]: normalisation makes cosine scale-free
    rng = np.random.default_rng(seed)
    x, codes = (a.astype(np.float32) for a in family_data(rng, "gaussian", m, k, d))
    s = np.float32(2.0**power)
    assume(all(np.all(np.abs(a[a != 0] * s) >= np.finfo(np.float32).tiny) for a in (x, codes)))
    ids, dist = fullvq_rt.nearest(x, codes, metric, return_distances=True, kernel=kernel)
    scaled_ids, scaled_dist = fullvq_rt.nearest(x * s, codes * s, metric, return_distances=True, kernel=kernel)
    np.testing.assert_array_equal(scaled_ids, ids)
    want = dist * np.float32(4.0**power) if metric == "l2" else dist
    np.testing.assert_array_equal(scaled_dist, want)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@settings(max_examples=20, **SETTINGS)
@given(size=sizes(max_m=20, max_k=60, max_d=16).filter(lambda s: s[0] > 0 and s[1] > 1),
       power=st.integers(60, 120), seed=st.integers(0, 2**32 - 1))
def test_tiny_l2_magnitudes_give_the_same_codes_as_unit_ones(size, kernel, power, seed):
    # 2**-60 .. 2**-120 (1e-18 .. 1e-36): finite, normal float32 inputs whose squared distances
    # underflow float32. The core scales the codebook by a power of two into float32's range, so
    # the codes are exactly those of the same arrays at unit scale (once, before the fix, every
    # code scored 0 here and index 0 came back).
    m, k, d = size
    rng = np.random.default_rng(seed)
    x, codes = (a.astype(np.float32) for a in family_data(rng, "gaussian", m, k, d))
    s = np.float32(2.0**-power)
    tiny_x, tiny_codes = x * s, codes * s
    assume(all(np.all(np.abs(a[a != 0]) >= np.finfo(np.float32).tiny) for a in (tiny_x, tiny_codes)))
    got = fullvq_rt.nearest(tiny_x, tiny_codes, kernel=kernel)
    np.testing.assert_array_equal(got, fullvq_rt.nearest(x, codes, kernel=kernel))
    np.testing.assert_array_equal(fullvq_rt.Codebook(tiny_codes, kernel=kernel).nearest(tiny_x), got)
    assert_float32_argmin(x, codes, got, "l2")  # the float64 argmin is scale-free


def test_tiny_codebook_scaling_keeps_distances_in_the_callers_units():
    # 2**-40: the squared distances (~2**-80) are normal float32 numbers, so they come back exact.
    rng = np.random.default_rng(5)
    x, codes = rng.standard_normal((50, 8)).astype(np.float32), rng.standard_normal((300, 8)).astype(np.float32)
    ids, dist = fullvq_rt.nearest(x, codes, return_distances=True)
    s = np.float32(2.0**-40)
    tiny_ids, tiny_dist = fullvq_rt.nearest(x * s, codes * s, return_distances=True)
    np.testing.assert_array_equal(tiny_ids, ids)
    np.testing.assert_array_equal(tiny_dist, dist * np.float32(2.0**-80))


def test_a_query_far_beyond_a_tiny_codebooks_scale_is_refused():
    # Codes ~1e-25 and a query ~1: the query is 1e25 times farther from the codes' mean than any
    # code, which float32 distances cannot order. Before scaling, this case underflowed silently.
    codes = np.float32(1e-25) * np.eye(3, dtype=np.float32)
    x = np.array([[0.0, 1.0, 0.0], [0.0, 1e-25, 0.0]], np.float32)
    with pytest.raises(ValueError, match=r"x row 0 is over 1e18 times farther .* same units"):
        fullvq_rt.nearest(x, codes)
    with pytest.raises(ValueError, match=r"x row 0 is over 1e18 times farther"):
        fullvq_rt.Codebook(codes).nearest(x)
    np.testing.assert_array_equal(fullvq_rt.nearest(x[1:], codes), [1])
    np.testing.assert_array_equal(fullvq_rt.nearest(x, codes, "cosine"), [1, 1])  # scale-free: no limit


# ------------------------------------------------------------------------------------------------
# dtypes and bad values at the boundary

ACCEPTED = [np.float32, np.float16, np.float64, np.longdouble, np.dtype(">f4"), np.dtype(">f8")]
REFUSED = [np.int8, np.int32, np.int64, np.uint8, np.uint64, np.bool_, np.complex64, np.complex128, np.object_,
           np.dtype("U3")]


@settings(max_examples=40, **SETTINGS)
@given(size=sizes(max_m=20, max_k=80, max_d=20), metric=st.sampled_from(METRICS),
       x_dtype=st.sampled_from(ACCEPTED), c_dtype=st.sampled_from(ACCEPTED), seed=st.integers(0, 2**32 - 1))
def test_floating_dtypes_are_converted_to_float32(size, metric, x_dtype, c_dtype, seed):
    # The documented contract: any floating dtype is converted to float32, the precision of the
    # arithmetic, so the result is that of the converted arrays, bit for bit.
    m, k, d = size
    rng = np.random.default_rng(seed)
    x64, c64 = family_data(rng, "gaussian", m, k, d)
    x, codes = x64.astype(x_dtype), c64.astype(c_dtype)
    want = fullvq_rt.nearest(x.astype(np.float32), codes.astype(np.float32), metric, return_distances=True)
    got = fullvq_rt.nearest(x, codes, metric, return_distances=True)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(fullvq_rt.Codebook(codes, metric).nearest(x), want[0])


@settings(max_examples=30, **SETTINGS)
@given(dtype=st.sampled_from(REFUSED), which=st.sampled_from(["x", "codebook"]), seed=st.integers(0, 2**32 - 1))
def test_other_dtypes_are_refused_with_a_value_error(dtype, which, seed):
    rng = np.random.default_rng(seed)
    x, codes = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((9, 4)).astype(np.float32)
    bad = (x if which == "x" else codes).astype(np.float64).round().astype(dtype)
    args = (bad, codes) if which == "x" else (x, bad)
    with pytest.raises(ValueError, match=f"{which} must be float32"):
        fullvq_rt.nearest(*args)
    with pytest.raises(ValueError, match=f"{which} must be float32"):
        if which == "x":
            fullvq_rt.Codebook(codes).nearest(bad)
        else:
            fullvq_rt.Codebook(bad)


@settings(max_examples=40, **SETTINGS)
@given(size=sizes(max_m=12, max_k=40, max_d=12).filter(lambda s: s[0] > 0), metric=st.sampled_from(METRICS),
       which=st.sampled_from(["x", "codebook"]), value=st.sampled_from([np.nan, np.inf, -np.inf]),
       n_bad=st.integers(1, 3), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**32 - 1))
def test_nan_and_inf_are_refused_naming_the_first_bad_row(size, metric, which, value, n_bad, layout, seed):
    m, k, d = size
    rng = np.random.default_rng(seed)
    x, codes = rng.standard_normal((m, d)).astype(np.float32), rng.standard_normal((k, d)).astype(np.float32)
    target = x if which == "x" else codes
    rows, cols = rng.integers(0, len(target), n_bad), rng.integers(0, d, n_bad)
    target[rows, cols] = value
    x, codes = laid_out(x, layout, 2), laid_out(codes, layout, 2)
    message = f"{which} row {rows.min()} contains NaN or Inf"
    with pytest.raises(ValueError, match=message):
        fullvq_rt.nearest(x, codes, metric)
    with pytest.raises(ValueError, match=message):
        if which == "x":
            fullvq_rt.Codebook(codes, metric).nearest(x)
        else:
            fullvq_rt.Codebook(codes, metric)


# ------------------------------------------------------------------------------------------------
# gather_nchw: code vectors of token ids in the decoder's NCHW layout


@settings(max_examples=60, **SETTINGS)
@given(k=st.integers(1, 300), d=st.integers(1, 40), shape=st.tuples(st.integers(1, 4), st.integers(1, 9),
                                                                   st.integers(1, 9)),
       id_dtype=st.sampled_from([np.int32, np.int64]), c_layout=st.sampled_from(LAYOUTS),
       seed=st.integers(0, 2**32 - 1))
def test_gather_equals_numpy_fancy_indexing(k, d, shape, id_dtype, c_layout, seed):
    rng = np.random.default_rng(seed)
    codes = rng.standard_normal((k, d)).astype(np.float32)
    ids = rng.integers(0, k, shape).astype(id_dtype)
    out = _core.gather_nchw(laid_out(codes, c_layout, 2), ids)
    assert out.dtype == np.float32 and out.shape == (shape[0], d, shape[1], shape[2])
    np.testing.assert_array_equal(out, codes[ids].transpose(0, 3, 1, 2))


@settings(max_examples=40, **SETTINGS)
@given(k=st.integers(1, 50), shape=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)),
       id_dtype=st.sampled_from([np.int32, np.int64]), bad=st.sampled_from(["negative", "k", "far"]),
       seed=st.integers(0, 2**32 - 1))
def test_gather_refuses_ids_outside_the_codebook(k, shape, id_dtype, bad, seed):
    rng = np.random.default_rng(seed)
    codes = rng.standard_normal((k, 3)).astype(np.float32)
    ids = rng.integers(0, k, shape).astype(id_dtype)
    flat = int(rng.integers(0, ids.size))
    value = {"negative": -1 - int(rng.integers(0, 1000)), "k": k, "far": int(np.iinfo(id_dtype).max)}[bad]
    ids.reshape(-1)[flat] = value
    with pytest.raises(ValueError, match=rf"token id {value} at flat position {flat} is outside \[0, {k}\)"):
        _core.gather_nchw(codes, ids)


@settings(max_examples=20, **SETTINGS)
@given(shape=st.tuples(st.integers(2, 4), st.integers(2, 6), st.integers(2, 6)), axis=st.integers(0, 2),
       seed=st.integers(0, 2**32 - 1))
def test_gather_refuses_non_contiguous_ids(shape, axis, seed):
    rng = np.random.default_rng(seed)
    codes = rng.standard_normal((10, 3)).astype(np.float32)
    ids = np.repeat(rng.integers(0, 10, shape).astype(np.int32), 2, axis=axis)
    view = ids[tuple(slice(None, None, 2) if a == axis else slice(None) for a in range(3))]
    with pytest.raises(ValueError, match="ids must be C-contiguous"):
        _core.gather_nchw(codes, view)
    np.testing.assert_array_equal(_core.gather_nchw(codes, np.ascontiguousarray(view)),
                                  codes[view].transpose(0, 3, 1, 2))


@settings(max_examples=10, **SETTINGS)
@given(shape=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)).filter(lambda s: 0 in s))
def test_gather_of_an_empty_grid_is_empty(shape):
    codes = np.eye(3, dtype=np.float32)
    ids = np.zeros(shape, np.int32)
    np.testing.assert_array_equal(_core.gather_nchw(codes, ids), codes[ids].transpose(0, 3, 1, 2))
