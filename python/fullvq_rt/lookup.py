"""Nearest-code lookup, the hot path of every encode call.

Shapes: x (M, D), codebook (K, D) -> indices (M,) int32 [, distances (M,) float32].
Metrics: "l2" (squared Euclidean) or "cosine" (both sides l2-normalised; distance 1 - cos).
Ties go to the lowest index. CPU arrays of any floating dtype are accepted (float16/float64 are
converted to float32, the precision of the arithmetic); CUDA arrays (anything with
``__dlpack__`` on a CUDA device) must be float32, stay on their device and give CUDA results.

CUDA arrays are handed over through the DLPack protocol for the core's stream: the core runs on
the legacy default stream of the array's device, so the array's producer is asked to order its
pending work on the array before that stream (``__dlpack__(stream=1)``), with the array's device
current (PyTorch refuses to export a tensor of another device than the current one).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import numpy as np

from . import _core

_DLPACK_CUDA_DEVICES = (2, 13)  # kDLCUDA, kDLCUDAManaged
_CORE_STREAM = 1  # DLPack's number of CUDA's legacy default stream, on which the core's kernels run


def _cuda_device(a: Any) -> int | None:
    """The CUDA device index of a DLPack array on a CUDA device, else None (CPU and non-DLPack)."""
    dlpack_device = getattr(a, "__dlpack_device__", None)
    if dlpack_device is None:
        return None
    kind, index = dlpack_device()
    return int(index) if kind in _DLPACK_CUDA_DEVICES else None


def _device_name(a: Any) -> str:
    index = _cuda_device(a)
    return "cpu" if index is None else f"cuda:{index}"


def _producer_device(a: Any, index: int) -> contextlib.AbstractContextManager:
    """A context in which ``a``'s framework has CUDA device ``index`` current.

    Frameworks synchronise their *current* stream of the *current* device in ``__dlpack__``, and
    PyTorch raises BufferError for a tensor of another device (nanobind then fell back to
    ``torch.utils.dlpack.to_dlpack``, which synchronises nothing). torch is never imported here:
    a torch tensor exists only once its module is loaded.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        return torch.cuda.device(index)
    device = getattr(a, "device", None)  # CuPy: the array's Device, itself a context manager
    if getattr(device, "id", None) == index and hasattr(device, "__enter__") and hasattr(device, "__exit__"):
        return device
    return contextlib.nullcontext()


def _cuda_capsule(a: Any, index: int, name: str) -> Any:
    """A DLPack capsule of CUDA array ``a`` (on device ``index``), ordered before the core's stream."""
    with _producer_device(a, index):
        try:
            return a.__dlpack__(stream=_CORE_STREAM)
        except BufferError as err:  # e.g. a torch tensor that requires grad
            raise ValueError(f"{name} cannot be shared with fullvq_rt through DLPack: {err}") from err


def _as_float32(a: Any, name: str) -> Any:
    """Returns ``a`` in a form the core takes: CUDA arrays as a DLPack capsule exported for the
    core's stream (see the module doc), CPU arrays as float32 numpy arrays."""
    index = _cuda_device(a)
    if index is not None:
        return _cuda_capsule(a, index, name)
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
    # Checked before the core prepares a CUDA codebook that would only be thrown away.
    x_device, codebook_device = _device_name(x), _device_name(codebook)
    if x_device != codebook_device:
        raise ValueError(f"x and the codebook are on different devices (x on {x_device}, codebook on "
                         f"{codebook_device}): move both to the same device")
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
