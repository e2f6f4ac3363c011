"""One sampling step of the generator: everything after the network.

logits (R, V) -> tokens (B,) int32. Without guidance (cfg_scale == 1) B = R; otherwise R = 2B,
rows [0, B) conditional and [B, 2B) unconditional, guided = uncond + cfg_scale * (cond - uncond)
(a token that is -inf in either row stays -inf). Then, per row:

- weights exp((g - max g) / temperature);
- ranking by guided logit, descending; equal logits rank the lower token index first;
- top-k keeps the first ``top_k`` tokens of the ranking (0 or >= V: off);
- top-p keeps the shortest prefix of the ranking whose weight is >= ``top_p`` times the weight
  kept by top-k (at least one token; 1.0: off);
- the draw: u = Philox4x32-10 (key ``seed``, counter (``step``, row)) in [0, 1); walking the kept
  tokens in token index order, the first whose cumulative weight exceeds u times the kept weight.

So the same (seed, step, logits) give the same tokens for any thread count; use one seed per
image batch and the token position as ``step``. -inf logits mask tokens; NaN and +inf are errors.
CPU arrays of any floating dtype are accepted (converted to float32); CUDA arrays (``__dlpack__``
on a CUDA device) must be float32 and give CUDA tokens; they are exported for the core's stream,
with their device current, so work still pending on them on another stream (a torch side stream)
is ordered before the sampler reads them (see :mod:`fullvq_rt.lookup`).
"""

from __future__ import annotations

import operator
from typing import Any

from . import _core
from .lookup import _as_float32

_INT64_MAX = 2**63 - 1


def checked_uint(value: Any, name: str, bits: int = 64) -> int:
    """``value`` as an int in [0, 2**bits), or a ValueError naming ``name``."""
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if not 0 <= number < 2**bits:
        raise ValueError(f"{name} must be an integer in [0, 2**{bits}), got {number}")
    return number


def sample_logits(
    logits: Any,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    step: int = 0,
    num_threads: int = 0,
    kernel: str = "auto",
) -> Any:
    """Samples one token per output row of ``logits`` (R, V) -> (B,) int32 (see the module doc).

    cfg_scale >= 0 (1.0: no guidance), temperature > 0, top_k >= 0 (0: off), top_p in (0, 1]
    (1.0: off), seed and step in [0, 2**64), num_threads >= 0 (0: all cores; CPU only).
    Bad values raise ValueError naming the parameter. ``kernel`` forces a CPU kernel from
    :func:`cpu_kernels` (for tests and benchmarks; every kernel draws the same tokens).
    """
    return _core.sample_logits(
        _as_float32(logits, "logits"), float(cfg_scale), float(temperature),
        min(checked_uint(top_k, "top_k"), _INT64_MAX), float(top_p),
        checked_uint(seed, "seed"), checked_uint(step, "step"), checked_uint(num_threads, "num_threads", 31), kernel,
    )
