"""GPU lookup (fullvq_rt on CUDA arrays) against the CPU path and a float64 reference.

Shapes: x (M, D), codebook (K, D) -> indices (M,) int32, distances (M,) float32, as CUDA arrays.
The reference runs on the GPU in float64, K in chunks, so large codebooks stay cheap.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fullvq_rt  # noqa: E402
from gpu_marks import GPU  # noqa: E402
from lookup_reference import ROUNDING, RTOL  # noqa: E402

pytestmark = GPU

METRICS = ("l2", "cosine")
REF_CHUNK_ELEMS = 1 << 27  # float64 distance block of the reference: 1 GiB


def _data(m: int, k: int, d: int, metric: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (m, d), codebook (k, d) float32 on cuda; l2 data sits off the origin to exercise centring."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    offset = 3.0 if metric == "l2" else 0.0
    x = torch.randn(m, d, device="cuda", generator=g) + offset
    codebook = torch.randn(k, d, device="cuda", generator=g) + offset
    return x, codebook


def _lookup(x, codebook, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """GPU indices (M,) int64 and distances (M,) float32 as torch tensors, checking the result types."""
    indices, distances = fullvq_rt.nearest(x, codebook, metric, return_distances=True)
    indices, distances = torch.from_dlpack(indices), torch.from_dlpack(distances)
    assert indices.dtype == torch.int32 and distances.dtype == torch.float32
    assert indices.device == x.device and distances.device == x.device
    assert indices.shape == distances.shape == (x.shape[0],)
    return indices.long(), distances


def _normalise(a: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit l2 norm; zero rows stay zero."""
    norm = a.norm(dim=1, keepdim=True)
    return a / torch.where(norm > 0, norm, torch.ones_like(norm))


def _reference(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 (best, runner-up) distances (M,), (M,); runner-up is +inf when K == 1."""
    x64, c64 = x.double(), codebook.double()
    if metric == "cosine":
        x64, c64 = _normalise(x64), _normalise(c64)
    else:  # centred expansion, as accurate as the direct form in float64
        mean = c64.mean(0)
        x64, c64 = x64 - mean, c64 - mean
    x_sq = (x64 * x64).sum(1, keepdim=True)
    top = torch.full((x.shape[0], 2), float("inf"), dtype=torch.float64, device=x.device)
    step = max(1, REF_CHUNK_ELEMS // max(1, x.shape[0]))
    for k0 in range(0, c64.shape[0], step):
        c = c64[k0:k0 + step]
        if metric == "cosine":
            dist = 1.0 - x64 @ c.T
        else:
            dist = (x_sq - 2.0 * (x64 @ c.T)) + (c * c).sum(1)
        chunk_top = dist.topk(min(2, c.shape[0]), dim=1, largest=False).values
        top = torch.cat([top, chunk_top], 1).topk(2, dim=1, largest=False).values
    return top[:, 0], top[:, 1]


def _distance_to(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, metric: str) -> torch.Tensor:
    """Float64 distance (M,) from each row of x to codebook[indices]."""
    x64, c64 = x.double(), codebook[indices].double()
    if metric == "cosine":
        return 1.0 - (_normalise(x64) * _normalise(c64)).sum(1)
    return ((x64 - c64) ** 2).sum(1)


def _tolerance(best, x, codebook, indices, metric: str) -> torch.Tensor:
    """The CPU tests' criterion (lookup_reference): 1e-5 relative plus float32 rounding (M,)."""
    if metric == "cosine":
        return RTOL * best + ROUNDING * 2.0
    mean = codebook.double().mean(0)
    scale = ((x.double() - mean) ** 2).sum(1) + ((codebook[indices].double() - mean) ** 2).sum(1)
    return RTOL * best + ROUNDING * scale


SHAPES = [
    (1, 1, 1),
    (1, 1000, 3),
    (257, 300, 1),
    (300, 1000, 3),
    (513, 1031, 17),
    (1000, 4099, 8),
    (129, 777, 256),
    (64, 2000, 512),
    (5, 70001, 8),
    pytest.param(4096, 1048576, 8, marks=pytest.mark.slow),
    pytest.param(2048, 262144, 256, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("m", "k", "d"), SHAPES)
def test_matches_cpu_and_float64(m: int, k: int, d: int, metric: str) -> None:
    x, codebook = _data(m, k, d, metric, seed=m * 7 + k * 13 + d)
    indices, distances = _lookup(x, codebook, metric)
    cpu = torch.from_numpy(fullvq_rt.nearest(x.cpu().numpy(), codebook.cpu().numpy(), metric)).long().cuda()

    best, runner_up = _reference(x, codebook, metric)
    tol = _tolerance(best, x, codebook, indices, metric)
    chosen = _distance_to(x, codebook, indices, metric)
    assert bool(((chosen - best).abs() <= tol).all()), "GPU index is not a nearest code"
    ambiguous = (runner_up - best) <= tol
    assert bool(((indices == cpu) | ambiguous).all()), "GPU and CPU indices differ on an unambiguous row"
    off = (distances.double() - chosen).abs() - (tol + RTOL * chosen)
    assert bool((off <= 0).all()), "returned distances differ from float64"


@pytest.mark.parametrize("metric", METRICS)
def test_empty_x(metric: str) -> None:
    x, codebook = _data(0, 100, 8, metric, seed=1)
    indices, distances = _lookup(x, codebook, metric)
    assert indices.numel() == distances.numel() == 0


@pytest.mark.parametrize("metric", METRICS)
def test_duplicate_codes_lowest_index_wins(metric: str) -> None:
    # Codes k and k + half are identical and half is not a multiple of any tile, so the copies land
    # in different tiles and blocks; queries equal to a code hit exact ties as well.
    half = 70001
    x, base = _data(1000, half, 16, metric, seed=5)
    codebook = torch.cat([base, base])
    x[:500] = codebook[half: half + 500]
    indices, _ = _lookup(x, codebook, metric)
    assert bool((indices < half).all())
    assert torch.equal(indices[:500], torch.arange(500, device="cuda"))
    same = torch.full((300, 4), 1.5, device="cuda")
    assert bool((_lookup(x[:, :4], same, metric)[0] == 0).all())


@pytest.mark.parametrize("metric", METRICS)
def test_strided_inputs(metric: str) -> None:
    x_wide, _ = _data(600, 1, 34, metric, seed=7)
    codebook_t = _data(1, 3001, 17, metric, seed=8)[1].T.contiguous().T  # column-major (K, D)
    for x in (x_wide[:, ::2], x_wide[::2, :17], x_wide.T.contiguous().T[:, 5:22]):
        assert not x.is_contiguous()
        expected = _lookup(x.contiguous(), codebook_t.contiguous(), metric)
        got = _lookup(x, codebook_t, metric)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_codebook_object() -> None:
    x, codebook = _data(777, 5000, 24, "l2", seed=9)
    book = fullvq_rt.Codebook(codebook)
    assert (book.size, book.dim, book.metric) == (5000, 24, "l2")
    assert book.device == f"cuda:{codebook.device.index}"
    first = torch.from_dlpack(book.nearest(x))
    again = torch.from_dlpack(book.nearest(x))
    assert first.device == x.device and torch.equal(first, again)
    assert torch.equal(first.long(), _lookup(x, codebook, "l2")[0])


def test_nonfinite_and_huge_rows_raise() -> None:
    x, codebook = _data(10, 50, 8, "l2", seed=11)
    book = fullvq_rt.Codebook(codebook)
    bad = x.clone()
    bad[3, 1] = float("nan")
    bad[7, 0] = float("inf")
    with pytest.raises(ValueError, match=r"x row 3 contains NaN or Inf"):
        book.nearest(bad)
    huge = x.clone()
    huge[2] = 1e19
    with pytest.raises(ValueError, match=r"x row 2 has squared norm .* > 1e37"):
        book.nearest(huge)
    bad_codes = codebook.clone()
    bad_codes[5, 7] = float("-inf")
    with pytest.raises(ValueError, match=r"codebook row 5 contains NaN or Inf"):
        fullvq_rt.Codebook(bad_codes, "cosine")


@pytest.mark.parametrize("power", [40, 90, 120])
def test_tiny_codebooks_give_the_cpu_codes_and_far_queries_the_cpu_error(power: int) -> None:
    # The power-of-two scaling of codebooks with a spread below 1 (checks.h l2_scale) on the GPU:
    # the same codes as at unit scale and as the CPU, distances in the caller's units.
    x, codebook = _data(300, 2000, 16, "l2", seed=15)
    s = 2.0**-power
    ids, dist = _lookup(x, codebook, "l2")
    tiny_ids, tiny_dist = _lookup(x * s, codebook * s, "l2")
    assert torch.equal(tiny_ids, ids)
    assert torch.equal(tiny_ids.int().cpu(), torch.from_numpy(fullvq_rt.nearest((x * s).cpu().numpy(),
                                                                               (codebook * s).cpu().numpy())))
    if power == 40:  # distances ~2**-80 are normal float32 numbers: exact
        assert torch.equal(tiny_dist, dist * 2.0**-80)
    if power < 90:  # a query of 1 is 2**power times the codes: farther than 1e18 only from 2**60 on
        return
    far = x * s
    far[4] = 1.0
    with pytest.raises(ValueError, match=r"x row 4 is over 1e18 times farther"):
        fullvq_rt.Codebook(codebook * s).nearest(far)


def test_mixed_devices_raise() -> None:
    x, codebook = _data(4, 20, 8, "l2", seed=12)
    with pytest.raises(ValueError):
        fullvq_rt.Codebook(codebook).nearest(x.cpu().numpy())
    with pytest.raises(ValueError):
        fullvq_rt.nearest(x, codebook.cpu().numpy())


def test_cupy_arrays() -> None:
    cupy = pytest.importorskip("cupy")
    x, codebook = _data(100, 300, 8, "l2", seed=13)
    expected = _lookup(x, codebook, "l2")[0]
    got = fullvq_rt.nearest(cupy.from_dlpack(x), cupy.from_dlpack(codebook))
    assert np.array_equal(cupy.asnumpy(cupy.from_dlpack(got)), expected.cpu().numpy())


def test_input_written_on_a_side_stream_is_read_after_it() -> None:
    # x is filled on a non-blocking torch side stream, behind a ~0.1 s sleep, and handed to the core
    # at once: the export (stream=1) must make the core's stream wait for the side stream.
    src, codebook = _data(4096, 3000, 32, "l2", seed=14)
    expected = _lookup(src, codebook, "l2")[0]
    x = torch.zeros_like(src)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        x.copy_(src)
        book = fullvq_rt.Codebook(codebook)
        got = torch.from_dlpack(book.nearest(x)).long()
        once = torch.from_dlpack(fullvq_rt.nearest(x, codebook)).long()
    torch.cuda.synchronize()
    assert torch.equal(got, expected) and torch.equal(once, expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensor_on_another_device_than_the_current_one() -> None:
    # torch refuses __dlpack__ for a tensor of another device than the current one (nanobind then
    # fell back to to_dlpack, which synchronises nothing): the export enters the tensor's device,
    # where torch's current stream is a side stream still writing x.
    src, codebook = (t.to("cuda:1") for t in _data(2048, 1000, 16, "cosine", seed=15))
    with torch.cuda.device(1):
        expected = _lookup(src, codebook, "cosine")[0]
        x = torch.zeros_like(src)
        side = torch.cuda.Stream()
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            torch.cuda._sleep(100_000_000)
            x.copy_(src)
            with torch.cuda.device(0):  # cuda:1's current stream stays `side`
                got = torch.from_dlpack(fullvq_rt.nearest(x, codebook, "cosine")).long()
                assert torch.cuda.current_device() == 0
    assert got.device == x.device and torch.equal(got, expected)


def test_mixed_cuda_devices_raise_before_any_work() -> None:
    x, codebook = _data(4, 20, 8, "l2", seed=16)
    with pytest.raises(ValueError, match=r"x on cpu, codebook on cuda:\d"):
        fullvq_rt.nearest(x.cpu().numpy(), codebook)


def test_tensor_that_requires_grad_is_refused_with_what_to_do() -> None:
    x, codebook = _data(4, 20, 8, "l2", seed=17)
    with pytest.raises(ValueError, match=r"x cannot be shared .*detach"):
        fullvq_rt.nearest(x.requires_grad_(), codebook)


def test_result_arrays_return_to_the_pool() -> None:
    # Results are pool allocations freed in stream order when their owner goes: 200 lookups of
    # 8 MB of results each (1.6 GB in all) leave the device's free memory where it was, give or
    # take the pool's cache (256 MB).
    x, codebook = _data(1_000_000, 2000, 16, "l2", seed=18)
    book = fullvq_rt.Codebook(codebook)
    expected = torch.from_dlpack(book.nearest(x)).clone()
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    for _ in range(200):
        got = torch.from_dlpack(book.nearest(x, return_distances=True)[0])
    torch.cuda.synchronize()
    assert torch.equal(got, expected)
    assert torch.cuda.mem_get_info()[0] > free_before - (512 << 20)
