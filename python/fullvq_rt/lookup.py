"""Nearest-code lookup, the hot path of every encode call.

Shapes: x (M, D), codebook (K, D) -> indices (M,) int32 [, distances (M,) float32].
Metrics: "l2" (squared Euclidean) or "cosine" (both sides l2-normalised; distance 1 - cos).
Ties go to the lowest index. CPU arrays of any floating dtype are accepted (float16/float64 are
converted to float32, the precision of the arithmetic); CUDA arrays (anything with
``__dlpack__`` on a CUDA device) must be float32, stay on their device and give CUDA results.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _core

_DLPACK_CUDA_DEVICES = (2, 13)  # kDLCUDA, kDLCUDAManaged


def _is_cuda(a: Any) -> bool:
    device = getattr(a, "__dlpack_device__", None)
    return device is not None and device()[0] in _DLPACK_CUDA_DEVICES


def _as_float32(a: Any, name: str) -> Any:
    """Returns ``a`` in a form the core takes: CUDA arrays as they are, CPU arrays as float32."""
    if _is_cuda(a):
        return a
    array = np.asarray(a)
    if array.dtype == np.float32:
        return array
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    raise ValueError(
        f"{name} must be float32 (float16 and float64 are converted), got {array.dtype}: "
        f"cast it with .astype(np.float32)"
    )


def _threads(num_threads: int | None) -> int:
    if num_threads is None:
        return 0
    if num_threads < 1:
        raise ValueError(f"num_threads must be a positive int or None (all cores), got {num_threads}")
    return num_threads


def nearest(
    x: Any,
    codebook: Any,
    metric: str = "l2",
    *,
    return_distances: bool = False,
    num_threads: int | None = None,
    kernel: str = "auto",
) -> Any:
    """Index of the nearest code for each row of ``x``.

    x (M, D), codebook (K, D) -> indices (M,) int32, or (indices, distances) with
    ``return_distances``. Packs the codebook in cache-sized chunks on the fly (extra memory
    O(M + threads * chunk)); for repeated lookups build a :class:`Codebook` once instead.
    ``kernel`` forces a CPU kernel from :func:`cpu_kernels` (for testing and benchmarks).
    """
    return _core.nearest(
        _as_float32(x, "x"), _as_float32(codebook, "codebook"), metric,
        return_distances, _threads(num_threads), kernel,
    )


class Codebook:
    """A codebook (K, D) prepared once (centred or normalised, packed for the SIMD kernel).

    Holds its own copy, so the source array may be released. Safe to share between threads:
    concurrent ``nearest`` calls run in parallel (the GIL is released).
    """

    def __init__(self, codebook: Any, metric: str = "l2", *, kernel: str = "auto") -> None:
        self._core = _core.Codebook(_as_float32(codebook, "codebook"), metric, kernel)

    def nearest(self, x: Any, *, return_distances: bool = False, num_threads: int | None = None) -> Any:
        """x (M, D) -> indices (M,) int32, or (indices, distances) with ``return_distances``."""
        return self._core.nearest(_as_float32(x, "x"), return_distances, _threads(num_threads))

    @property
    def size(self) -> int:
        """Number of codes K."""
        return self._core.size

    @property
    def dim(self) -> int:
        """Code dimension D."""
        return self._core.dim

    @property
    def metric(self) -> str:
        return self._core.metric

    @property
    def device(self) -> str:
        """"cpu" or "cuda:N"."""
        return self._core.device

    @property
    def kernel(self) -> str:
        """The kernel that runs the lookup: a name from :func:`cpu_kernels`, or "cuda"."""
        return self._core.kernel

    def __repr__(self) -> str:
        return (f"Codebook(size={self.size}, dim={self.dim}, metric={self.metric!r}, "
                f"device={self.device!r}, kernel={self.kernel!r})")


def cpu_kernels() -> list[str]:
    """The CPU kernels this machine can run, best first (e.g. ["avx512", "avx2", "scalar"])."""
    return _core.cpu_kernels()


def cuda_available() -> bool:
    """Whether this build has the CUDA kernels and a CUDA device is usable."""
    return _core.cuda_available()
