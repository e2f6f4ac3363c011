"""fullvq_rt.sample_logits on the CPU: distribution, filtering, ties, Philox draws, determinism, errors.

Shapes: logits (R, V) float32 -> tokens (B,) int32; B = R, or R / 2 with cfg_scale != 1.
"""

import numpy as np
import pytest

import fullvq_rt
from cpu_kernels import KERNEL_PARAMS
from sampler_reference import PHILOX_KAT, chi_square_pvalue, filtered_probs, kept_tokens, guided
from sampler_reference import philox4x32_10, uniform_bits

P_MIN = 1e-4  # chi-square p-value below which the draws do not fit
DRAW_ROWS, DRAW_STEPS = 200, 100  # 20000 draws: copies of one row, sampled at 100 steps
BASE = np.array([1.3, -0.4, 0.9, 2.1, -1.7, 0.2, 1.8, -0.9, 0.5, 1.1, -2.5, 0.0], np.float32)
UNCOND = np.array([0.4, 0.6, 1.5, 0.8, -0.2, 0.9, 0.1, 0.3, -1.0, 1.2, 0.7, -0.5], np.float32)


def draws(row: np.ndarray, seed: int = 0, **params) -> np.ndarray:
    """DRAW_ROWS * DRAW_STEPS tokens sampled from copies of one logit row (V,), or of a (2, V)
    conditional/unconditional pair with cfg_scale."""
    halves = np.atleast_2d(row)
    logits = np.concatenate([np.repeat(h[None], DRAW_ROWS, 0) for h in halves])
    return np.concatenate([fullvq_rt.sample_logits(logits, seed=seed, step=s, **params) for s in range(DRAW_STEPS)])


def pair() -> np.ndarray:
    return np.stack([BASE, UNCOND])


FIT_CASES = [
    (BASE, dict(temperature=0.5)),
    (BASE, dict(temperature=2.0)),
    (BASE, dict(top_k=4)),
    (BASE, dict(top_p=0.7)),
    (BASE, dict(top_k=5, top_p=0.6, temperature=1.5)),
    (pair(), dict(cfg_scale=0.0)),
    (pair(), dict(cfg_scale=1.5)),
    (pair(), dict(cfg_scale=4.0)),
    (pair(), dict(cfg_scale=1.5, temperature=0.8, top_k=6, top_p=0.8)),
]


@pytest.mark.parametrize("row,params", FIT_CASES)
def test_draws_fit_the_filtered_distribution(row, params):
    tokens = draws(row, seed=7, **params)
    probs = filtered_probs(np.atleast_2d(row), **params)[0]
    assert chi_square_pvalue(tokens, probs) > P_MIN


def test_the_fit_check_rejects_a_wrong_distribution():
    tokens = draws(BASE, seed=7, temperature=1.0)
    assert chi_square_pvalue(tokens, filtered_probs(BASE[None], temperature=1.0)[0]) > P_MIN
    assert chi_square_pvalue(tokens, filtered_probs(BASE[None], temperature=1.2)[0]) < P_MIN
    assert chi_square_pvalue(tokens, filtered_probs(BASE[None], top_k=11)[0]) < P_MIN


def test_philox_matches_random123_known_answers():
    for counter, key, expected in PHILOX_KAT:
        assert philox4x32_10(counter, key) == expected


@pytest.mark.parametrize("seed", [0, 1, 2**32 + 5, 2**64 - 1])
def test_draws_are_philox_uniforms(seed):
    # Equal logits over V = 2**16: the token is the top 16 bits of u exactly.
    rows, steps = 8, [0, 1, 2**32 + 3, 2**64 - 1]
    logits = np.zeros((rows, 1 << 16), np.float32)
    for step in steps:
        expected = [uniform_bits(seed, step, r) >> 37 for r in range(rows)]
        np.testing.assert_array_equal(fullvq_rt.sample_logits(logits, seed=seed, step=step), expected)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_top_k_1_is_argmax_and_ties_go_to_the_lowest_index(rng, cfg_scale):
    batch = 8
    logits = rng.standard_normal((batch if cfg_scale == 1.0 else 2 * batch, 5000)).astype(np.float32)
    best = guided(logits, cfg_scale).argmax(1)
    for b in range(4):  # rows 0..3: the best logit (both halves with guidance) copied to the last columns
        for r in range(b, len(logits), batch):
            logits[r, -3:] = logits[r, best[b]]
    expected = guided(logits, cfg_scale).argmax(1)  # the first of equal maxima
    np.testing.assert_array_equal(expected[:4], best[:4])
    for step in range(5):
        tokens = fullvq_rt.sample_logits(logits, cfg_scale=cfg_scale, top_k=1, step=step, temperature=3.0)
        np.testing.assert_array_equal(tokens, expected)


def test_top_k_ties_at_the_boundary_keep_the_lower_indices():
    logits = np.zeros((DRAW_ROWS, 10), np.float32)
    logits[:, [2, 5, 7]] = 1.0
    tokens = np.concatenate([fullvq_rt.sample_logits(logits, top_k=2, step=s) for s in range(20)])
    assert set(np.unique(tokens)) == {2, 5}


def test_top_p_on_equal_logits_keeps_the_lowest_indices():
    # Ten equal tokens: 0.35 needs four of them (0.3 < 0.35 <= 0.4).
    tokens = np.concatenate([fullvq_rt.sample_logits(np.zeros((DRAW_ROWS, 10), np.float32), top_p=0.35, step=s)
                             for s in range(40)])
    assert set(np.unique(tokens)) == {0, 1, 2, 3}
    assert chi_square_pvalue(tokens, np.array([0.25] * 4 + [0.0] * 6)) > P_MIN


@pytest.mark.parametrize("v", [1000, 262144])
@pytest.mark.parametrize("params", [dict(top_k=50), dict(top_p=0.5), dict(top_k=3000, top_p=0.9, temperature=0.7),
                                    dict(top_p=0.99, cfg_scale=2.0), dict(top_k=1, cfg_scale=0.5)])
def test_tokens_stay_in_the_kept_set(rng, v, params):
    rows = 4
    logits = (2 * rng.standard_normal((2 * rows if "cfg_scale" in params else rows, v))).astype(np.float32)
    kept = kept_tokens(guided(logits, params.get("cfg_scale", 1.0)), params.get("temperature", 1.0),
                       params.get("top_k", 0), params.get("top_p", 1.0))
    steps = 40 if v < 10000 else 6
    tokens = np.stack([fullvq_rt.sample_logits(logits, step=s, **params) for s in range(steps)], 1)
    for b in range(rows):
        assert np.isin(tokens[b], kept[b]).all()
    if v < 10000 and params.get("top_k") != 1:  # the draws reach beyond the most likely tokens
        assert len(np.unique(tokens)) > 2 * rows


def test_masked_tokens_are_never_drawn(rng):
    logits = rng.standard_normal((8, 64)).astype(np.float32)
    logits[:, ::2] = -np.inf
    cond_mask = logits.copy()
    cond_mask[:4, 1::4] = -np.inf  # masked in the conditional half only: masked after guidance too
    for step in range(30):
        assert (fullvq_rt.sample_logits(logits, step=step, temperature=5.0) % 2 == 1).all()
        tokens = fullvq_rt.sample_logits(cond_mask, cfg_scale=2.0, step=step, temperature=5.0)
        assert (tokens % 4 == 3).all()


@pytest.mark.parametrize("params", [dict(), dict(cfg_scale=2.5, top_k=40, top_p=0.9)])
def test_same_seed_and_step_give_the_same_tokens_for_any_thread_count(rng, params):
    logits = rng.standard_normal((32, 20000)).astype(np.float32)
    first = fullvq_rt.sample_logits(logits, seed=3, step=11, num_threads=1, **params)
    for threads in (0, 1, 2, 3):
        np.testing.assert_array_equal(fullvq_rt.sample_logits(logits, seed=3, step=11, num_threads=threads, **params),
                                      first)
    assert (fullvq_rt.sample_logits(logits, seed=3, step=12, **params) != first).any()
    assert (fullvq_rt.sample_logits(logits, seed=4, step=11, **params) != first).any()


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@pytest.mark.parametrize("params", [dict(), dict(cfg_scale=2.5, top_k=300, top_p=0.9, temperature=0.6),
                                    dict(top_p=0.5)])
def test_every_cpu_kernel_draws_the_same_tokens(rng, kernel, params):
    # 1237 columns: a partial vector at the end of every row
    logits = rng.standard_normal((12, 1237)).astype(np.float32)
    logits[:, ::7] = -np.inf
    for step in range(3):
        np.testing.assert_array_equal(fullvq_rt.sample_logits(logits, kernel=kernel, seed=2, step=step, **params),
                                      fullvq_rt.sample_logits(logits, kernel="scalar", seed=2, step=step, **params))
    with pytest.raises(ValueError, match="unknown kernel 'sse9'"):
        fullvq_rt.sample_logits(logits, kernel="sse9")


def test_rows_with_a_wider_stride_and_other_float_dtypes(rng):
    wide = rng.standard_normal((6, 300)).astype(np.float32)
    view, copy = wide[:, :200], np.ascontiguousarray(wide[:, :200])
    np.testing.assert_array_equal(fullvq_rt.sample_logits(view, seed=1, top_p=0.8),
                                  fullvq_rt.sample_logits(copy, seed=1, top_p=0.8))
    np.testing.assert_array_equal(fullvq_rt.sample_logits(copy.astype(np.float64), seed=1),
                                  fullvq_rt.sample_logits(copy, seed=1))


def test_output_shape_dtype_and_empty_batch():
    tokens = fullvq_rt.sample_logits(np.zeros((6, 7), np.float32), cfg_scale=2.0)
    assert tokens.shape == (3,) and tokens.dtype == np.int32
    assert fullvq_rt.sample_logits(np.zeros((0, 7), np.float32)).shape == (0,)
    assert fullvq_rt.sample_logits(np.zeros((1, 1), np.float32), top_p=0.1, top_k=1)[0] == 0


def test_extreme_temperatures(rng):
    logits = rng.standard_normal((8, 500)).astype(np.float32)
    np.testing.assert_array_equal(fullvq_rt.sample_logits(logits, temperature=1e-30), logits.argmax(1))
    tokens = np.concatenate([fullvq_rt.sample_logits(logits[:1].repeat(DRAW_ROWS, 0), temperature=1e30, step=s)
                             for s in range(50)])
    assert chi_square_pvalue(tokens, np.full(500, 1 / 500)) > P_MIN  # uniform


def _finite(r=4, v=6):
    return np.zeros((r, v), np.float32)


def _with(value, row=2, col=3, r=4):
    x = _finite(r)
    x[row, col] = value
    return x


BAD = [
    (dict(cfg_scale=-0.5), "cfg_scale"),
    (dict(cfg_scale=float("inf")), "cfg_scale"),
    (dict(cfg_scale=float("nan")), "cfg_scale"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**64), "seed"),
    (dict(step=-3), "step"),
    (dict(num_threads=-1), "num_threads"),
]


@pytest.mark.parametrize("params,name", BAD)
def test_bad_parameters_name_themselves(params, name):
    with pytest.raises(ValueError, match=name):
        fullvq_rt.sample_logits(_finite(), **params)


@pytest.mark.parametrize("logits,params,words", [
    (_finite(3), dict(cfg_scale=2.0), r"cfg_scale=2 needs an even number of rows"),
    (np.zeros((2, 3), np.int32), dict(), r"logits must be float32.*int32"),
    (np.zeros(5, np.float32), dict(), r"logits must have shape \(R, V\), got 1-D"),
    (np.zeros((2, 2, 2), np.float32), dict(), r"logits must have shape \(R, V\), got 3-D"),
    (np.zeros((2, 0), np.float32), dict(), r"V >= 1"),
    (np.zeros((2, 8), np.float32)[:, ::2], dict(), r"logits columns must be contiguous"),
    (_with(np.nan), dict(), r"logits row 2 contains NaN"),
    (_with(np.inf), dict(), r"logits row 2 contains \+inf"),
    (_with(np.nan), dict(cfg_scale=3.0, top_k=2), r"logits row 2 contains NaN"),
    (np.where(np.arange(4)[:, None] == 1, -np.inf, _finite()).astype(np.float32), dict(), r"logits row 1 is all -inf"),
    (np.where(np.arange(4)[:, None] == 3, -np.inf, _finite()).astype(np.float32), dict(cfg_scale=2.0),
     r"logits row 3 is all -inf"),
    (np.array([[0, -np.inf], [-np.inf, 0]], np.float32), dict(cfg_scale=2.0),
     r"every token of guided row 0 is masked"),
    (np.array([[3e38, 0], [-3e38, 0]], np.float32), dict(cfg_scale=2.0), r"guided logits of row 0 overflow"),
])
def test_bad_logits_are_named(logits, params, words):
    with pytest.raises(ValueError, match=words):
        fullvq_rt.sample_logits(logits, **params)
