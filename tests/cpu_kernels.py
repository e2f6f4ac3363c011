"""Every CPU kernel of fullvq_rt's core as a pytest parameter (the lookup and the sampler share the names).

A kernel this CPU cannot run shows as a skip that says why instead of going untested in silence: an
AVX2-only host reports its AVX-512 cases as skipped.
"""

from __future__ import annotations

import pytest

import fullvq_rt

ALL_KERNELS = ("avx512", "avx2", "scalar")  # cpp/lookup.cpp kKernels and cpp/sampler.cpp, best first
AVAILABLE = fullvq_rt.cpu_kernels()

KERNEL_PARAMS = [
    pytest.param(name, id=name, marks=pytest.mark.skipif(
        name not in AVAILABLE, reason=f"this CPU cannot run the {name} kernel (it runs: {', '.join(AVAILABLE)})"))
    for name in ALL_KERNELS
]
