"""fullvq_rt.nearest / fullvq_rt.Codebook on the CPU, every kernel this machine runs."""

import subprocess
import sys
import threading

import numpy as np
import pytest

import fullvq_rt
from cpu_kernels import ALL_KERNELS, AVAILABLE, KERNEL_PARAMS
from lookup_reference import assert_nearest

MIN_WORK_PER_THREAD = 4 * 2**20  # cpp/lookup.cpp kMinWorkPerThread
METRICS = ["l2", "cosine"]


def gaussian(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(
    "m,k,d",
    [(1, 1, 1), (0, 5, 3), (1, 37, 8), (7, 1, 16), (33, 1000, 1), (50, 333, 17), (129, 4099, 8),
     (64, 2048, 32), (23, 517, 256), (10, 300, 1024), (200, 16384, 8)],
)
def test_agrees_with_float64_reference(rng, kernel, metric, m, k, d):
    x, codes = gaussian(rng, m, d), gaussian(rng, k, d)
    book = fullvq_rt.Codebook(codes, metric, kernel=kernel)
    indices, dist = book.nearest(x, return_distances=True)
    assert_nearest(x, codes, indices, metric, returned_distances=dist)
    once, once_dist = fullvq_rt.nearest(x, codes, metric, return_distances=True, kernel=kernel)
    np.testing.assert_array_equal(once, indices)
    np.testing.assert_array_equal(once_dist, dist)


def test_empty_query_gives_empty_result(rng):
    indices = fullvq_rt.nearest(np.zeros((0, 4), np.float32), gaussian(rng, 10, 4))
    assert indices.shape == (0,) and indices.dtype == np.int32


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_million_codes(rng, kernel):
    codes = gaussian(rng, 1 << 20, 8)
    picked = rng.choice(len(codes), 48, replace=False)
    x = np.concatenate([codes[picked] + 1e-3 * gaussian(rng, 48, 8), gaussian(rng, 16, 8)])
    indices = fullvq_rt.nearest(x, codes, kernel=kernel)
    assert_nearest(x, codes, indices)
    np.testing.assert_array_equal(indices[:48], picked)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_duplicate_codes_lowest_index_wins(rng, kernel, metric, threads):
    # Copies of each code at indices spread over every thread's share of the codebook.
    base = gaussian(rng, 40, 12)
    codes = np.tile(base, (150, 1))
    x = base[rng.integers(0, 40, 500)] + 0.01 * gaussian(rng, 500, 12)
    assert_enough_work_for(threads, len(x), len(codes), 12)
    indices = fullvq_rt.Codebook(codes, metric, kernel=kernel).nearest(x, num_threads=threads)
    assert np.all(indices < 40)
    assert_nearest(x, codes, indices, metric)


def assert_enough_work_for(threads: int, m: int, k: int, d: int) -> None:
    """The core gives a thread at least MIN_WORK_PER_THREAD multiply-adds (cpp/lookup.cpp
    kMinWorkPerThread); a test of `threads` threads must give them that much, or it runs on fewer."""
    assert m * k * (d + 2) >= threads * MIN_WORK_PER_THREAD, (m, k, d, threads)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_all_equal_distances_give_index_zero(kernel):
    # 4 threads, each scanning its own range of codes: ties across the ranges still go to code 0.
    codes = np.ones((200_000, 8), np.float32)
    assert_enough_work_for(4, 9, len(codes), 8)
    assert np.all(fullvq_rt.nearest(np.zeros((9, 8), np.float32), codes, kernel=kernel, num_threads=4) == 0)


@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("m,k", [(300, 9000), (40000, 40)])  # split over codes / over rows
def test_thread_count_does_not_change_results(rng, threads, m, k):
    assert_enough_work_for(threads, m, k, 16)
    x, codes = gaussian(rng, m, 16), gaussian(rng, k, 16)
    expected = fullvq_rt.nearest(x, codes, num_threads=1)
    np.testing.assert_array_equal(fullvq_rt.nearest(x, codes, num_threads=threads), expected)
    np.testing.assert_array_equal(fullvq_rt.Codebook(codes).nearest(x, num_threads=threads), expected)
    assert_nearest(x, codes, expected)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_large_norms(rng, kernel):
    # Codes far from the origin (a large shared offset) and a large spread, near the 1e37 limit.
    offset = 1e4 + gaussian(rng, 1, 16)
    codes = offset + gaussian(rng, 3000, 16)
    x = codes[rng.integers(0, 3000, 200)] + 0.05 * gaussian(rng, 200, 16)
    assert_nearest(x, codes, fullvq_rt.nearest(x, codes, kernel=kernel))
    big_codes, big_x = 1e17 * gaussian(rng, 500, 8), 1e17 * gaussian(rng, 100, 8)
    assert_nearest(big_x, big_codes, fullvq_rt.nearest(big_x, big_codes, kernel=kernel))


def test_norm_overflow_is_rejected(rng):
    codes = gaussian(rng, 10, 4)
    codes[3] = 1e19
    with pytest.raises(ValueError, match=r"codebook row 3 has squared norm .* rescale"):
        fullvq_rt.Codebook(codes)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_cosine_zero_vectors(rng, kernel):
    codes = gaussian(rng, 100, 8)
    codes[10] = 0
    x = np.zeros((3, 8), np.float32)
    x[1] = -codes.sum(0)  # pointing away from most codes
    x[2] = codes[42]
    indices, dist = fullvq_rt.nearest(x, codes, "cosine", return_distances=True, kernel=kernel)
    assert indices[0] == 0 and dist[0] == pytest.approx(1.0)  # zero query: similarity 0 to all
    assert_nearest(x, codes, indices, "cosine", returned_distances=dist)
    assert indices[2] == 42 and dist[2] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_rejected(rng, bad):
    codes, x = gaussian(rng, 50, 4), gaussian(rng, 6, 4)
    x[4, 2] = bad
    with pytest.raises(ValueError, match="x row 4 contains NaN or Inf"):
        fullvq_rt.nearest(x, codes)
    with pytest.raises(ValueError, match="x row 4 contains NaN or Inf"):
        fullvq_rt.Codebook(codes).nearest(x)
    codes[7, 0] = bad
    with pytest.raises(ValueError, match="codebook row 7 contains NaN or Inf"):
        fullvq_rt.Codebook(codes)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_strided_and_non_contiguous_inputs(rng, kernel):
    big_codes, big_x = gaussian(rng, 800, 20), gaussian(rng, 90, 30)
    cases = [
        (big_x[:, ::3], big_codes[::2, ::2]),           # column and row strides
        (big_x[::-1, :10], big_codes[::-1, 5:15]),      # negative strides
        (np.asfortranarray(big_x[:, :20]), np.asfortranarray(big_codes)),
        (big_x[:, :20].T.copy().T, big_codes.T.copy().T),  # transposed views
    ]
    for x, codes in cases:
        expected = fullvq_rt.nearest(np.ascontiguousarray(x), np.ascontiguousarray(codes), kernel=kernel)
        np.testing.assert_array_equal(fullvq_rt.nearest(x, codes, kernel=kernel), expected)
        np.testing.assert_array_equal(fullvq_rt.Codebook(codes, kernel=kernel).nearest(x), expected)


def test_torch_cpu_tensors_are_accepted(rng):
    torch = pytest.importorskip("torch")
    x, codes = gaussian(rng, 40, 8), gaussian(rng, 500, 8)
    result = fullvq_rt.nearest(torch.from_numpy(x), torch.from_numpy(codes).double())
    np.testing.assert_array_equal(result, fullvq_rt.nearest(x, codes))


def test_other_float_dtypes_are_converted(rng):
    x, codes = gaussian(rng, 40, 8), gaussian(rng, 500, 8)
    expected = fullvq_rt.nearest(x, codes)
    np.testing.assert_array_equal(fullvq_rt.nearest(x.astype(np.float64), codes.astype(np.float64)), expected)
    half = fullvq_rt.nearest(x.astype(np.float16), codes)
    assert_nearest(x.astype(np.float16).astype(np.float32), codes, half)


@pytest.mark.parametrize(
    "x,codes,message",
    [
        (np.zeros((3, 4), np.int64), np.zeros((5, 4), np.float32), "x must be float32 .* got int64"),
        (np.zeros((3, 4), np.float32), np.zeros((5, 4), np.complex64), "codebook must be float32 .* got complex64"),
        (np.zeros(4, np.float32), np.zeros((5, 4), np.float32),
         r"x must have shape \(M, 4\), got 1-D array of shape \(4,\)"),
        (np.zeros((2, 3, 4), np.float32), np.zeros((5, 4), np.float32), r"x must have shape \(M, 4\), got 3-D"),
        (np.zeros((3, 5), np.float32), np.zeros((5, 4), np.float32),
         r"x has 5 columns .* expected x of shape \(M, 4\)"),
        (np.zeros((3, 4), np.float32), np.zeros((0, 4), np.float32), r"codebook has shape \(0, 4\)"),
        (np.zeros((3, 0), np.float32), np.zeros((5, 0), np.float32), r"codebook has shape \(5, 0\)"),
    ],
)
def test_bad_arguments_name_expected_and_actual(x, codes, message):
    with pytest.raises(ValueError, match=message):
        fullvq_rt.nearest(x, codes)


def test_the_kernel_list_names_every_kernel_this_build_has():
    # KERNEL_PARAMS runs (or visibly skips) each of ALL_KERNELS: a kernel missing from it would go untested.
    assert set(AVAILABLE) <= set(ALL_KERNELS) and "scalar" in AVAILABLE
    assert AVAILABLE == [name for name in ALL_KERNELS if name in AVAILABLE]  # best first, as "auto" picks
    for name in set(ALL_KERNELS) - set(AVAILABLE):
        with pytest.raises(ValueError, match=f"kernel '{name}' is not supported by this CPU"):
            fullvq_rt.nearest(np.zeros((1, 4), np.float32), np.zeros((2, 4), np.float32), kernel=name)


def test_bad_options(rng):
    codes = gaussian(rng, 5, 4)
    with pytest.raises(ValueError, match="unknown metric 'dot': expected 'l2' or 'cosine'"):
        fullvq_rt.Codebook(codes, "dot")
    with pytest.raises(ValueError, match="unknown kernel 'neon'"):
        fullvq_rt.nearest(codes, codes, kernel="neon")
    with pytest.raises(ValueError, match="num_threads must be a positive int"):
        fullvq_rt.nearest(codes, codes, num_threads=0)


def test_concurrent_calls_on_one_codebook(rng):
    codes, x = gaussian(rng, 20000, 16), gaussian(rng, 2000, 16)
    book = fullvq_rt.Codebook(codes)
    expected = book.nearest(x, num_threads=1)
    results = [None] * 8

    def work(i):
        results[i] = book.nearest(x)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        np.testing.assert_array_equal(r, expected)


def test_codebook_keeps_its_own_copy(rng):
    codes, x = gaussian(rng, 300, 8), gaussian(rng, 50, 8)
    book = fullvq_rt.Codebook(codes)
    expected = book.nearest(x)
    codes[:] = 0
    del codes
    np.testing.assert_array_equal(book.nearest(x), expected)
    assert (book.size, book.dim, book.metric, book.device) == (300, 8, "l2", "cpu")
    assert book.kernel == AVAILABLE[0] and "Codebook(size=300" in repr(book)


def _peak_rss_growth(fn) -> int:
    """Peak resident memory added while fn runs, in bytes (Linux: resets the high-water mark)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(key)).split()[1]) * 1024

    before = status("VmRSS:")
    fn()
    return status("VmHWM:") - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_memory_does_not_grow_with_m_times_k(rng):
    # An M x K float32 distance matrix would be 256 MiB here.
    codes, x = gaussian(rng, 262144, 32), gaussian(rng, 256, 32)
    growth = _peak_rss_growth(lambda: fullvq_rt.nearest(x, codes))
    assert growth < 32 << 20, f"one-shot lookup grew the peak RSS by {growth >> 20} MiB"
    book = fullvq_rt.Codebook(codes)
    growth = _peak_rss_growth(lambda: book.nearest(x))
    assert growth < 8 << 20, f"Codebook.nearest grew the peak RSS by {growth >> 20} MiB"


def test_import_does_not_pull_torch():
    code = "import sys, fullvq_rt; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
