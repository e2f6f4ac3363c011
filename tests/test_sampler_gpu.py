"""fullvq_rt.sample_logits on CUDA arrays: the same tokens as the CPU, the right distribution, errors.

Shapes: logits (R, V) float32 on cuda -> tokens (B,) int32 on the same device.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fullvq_rt  # noqa: E402
from gpu_marks import GPU  # noqa: E402
from sampler_reference import chi_square_pvalue, filtered_probs  # noqa: E402

pytestmark = GPU

PARAMS = [
    dict(),
    dict(temperature=0.7),
    dict(top_k=50),
    dict(top_p=0.8),
    dict(cfg_scale=3.0, top_k=2000, top_p=0.95),
    dict(cfg_scale=0.0, temperature=1.3, top_p=0.5),
    dict(cfg_scale=1.5, top_k=1),
]


def _gpu_tokens(logits: np.ndarray, **params) -> np.ndarray:
    tokens = fullvq_rt.sample_logits(torch.from_numpy(logits).cuda(), **params)
    tokens = torch.from_dlpack(tokens)
    assert tokens.device.type == "cuda" and tokens.dtype == torch.int32
    return tokens.cpu().numpy()


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("v", [1000, 262144])
def test_gpu_tokens_equal_cpu_tokens(params, v):
    rows = 16 if "cfg_scale" in params else 8
    logits = (2 * np.random.default_rng(v).standard_normal((rows, v))).astype(np.float32)
    for step in range(4):
        np.testing.assert_array_equal(_gpu_tokens(logits, seed=9, step=step, **params),
                                      fullvq_rt.sample_logits(logits, seed=9, step=step, **params))


def test_gpu_draws_fit_the_filtered_distribution():
    row = np.array([1.3, -0.4, 0.9, 2.1, -1.7, 0.2, 1.8, -0.9, 0.5, 1.1, -2.5, 0.0], np.float32)
    params = dict(temperature=0.8, top_k=8, top_p=0.9)
    logits = torch.from_numpy(np.repeat(row[None], 1000, 0)).cuda()
    tokens = np.concatenate([torch.from_dlpack(fullvq_rt.sample_logits(logits, seed=5, step=s, **params)).cpu().numpy()
                             for s in range(20)])
    assert chi_square_pvalue(tokens, filtered_probs(row[None], **params)[0]) > 1e-4


def test_gpu_ties_and_masks():
    logits = np.zeros((4, 10), np.float32)
    logits[:, [2, 5, 7]] = 1.0
    logits[:, 0] = -np.inf
    for step in range(20):
        assert set(_gpu_tokens(logits, top_k=2, step=step)) <= {2, 5}
        assert 0 not in _gpu_tokens(logits, temperature=10.0, step=step)


@pytest.mark.parametrize("value,words", [(np.nan, "logits row 1 contains NaN"),
                                         (np.inf, r"logits row 1 contains \+inf")])
def test_gpu_bad_logits_are_named(value, words):
    logits = np.zeros((4, 100), np.float32)
    logits[1, 17] = value
    with pytest.raises(ValueError, match=words):
        _gpu_tokens(logits)
    with pytest.raises(ValueError, match="temperature"):
        _gpu_tokens(np.zeros((2, 5), np.float32), temperature=0.0)


def test_gpu_logits_written_on_a_side_stream_are_read_after_it():
    # The logits are written on a non-blocking torch side stream behind a ~0.1 s sleep and sampled
    # at once: the export (stream=1) must order the side stream's work before the sampler's.
    logits = (2 * np.random.default_rng(3).standard_normal((16, 50000))).astype(np.float32)
    expected = fullvq_rt.sample_logits(logits, cfg_scale=2.0, top_k=100, top_p=0.9, seed=4)
    src = torch.from_numpy(logits).cuda()
    x = torch.full_like(src, float("nan"))  # read early, it raises
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        x.copy_(src)
        tokens = fullvq_rt.sample_logits(x, cfg_scale=2.0, top_k=100, top_p=0.9, seed=4)
    np.testing.assert_array_equal(torch.from_dlpack(tokens).cpu().numpy(), expected)


def test_gpu_large_ranked_batch():
    # The radix sort ping-pongs between its two buffers (cub::DoubleBuffer): whichever holds the
    # result, the tokens match the CPU's, over several steps so that pooled scratch is reused.
    logits = (2 * np.random.default_rng(6).standard_normal((64, 262144))).astype(np.float32)
    gpu = torch.from_numpy(logits).cuda()
    for step in range(3):
        got = torch.from_dlpack(fullvq_rt.sample_logits(gpu, top_k=1000, top_p=0.9, seed=1, step=step))
        np.testing.assert_array_equal(got.cpu().numpy(),
                                      fullvq_rt.sample_logits(logits, top_k=1000, top_p=0.9, seed=1, step=step))
