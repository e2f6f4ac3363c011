"""Comparing code indices that two float32 computations chose for the same latents.

Two paths that compute the same function in float32 (another backend, batch size, thread count or
instruction set) round differently, so a latent almost equidistant from two codes may go either
way. Such a flip is not a bug; any other difference is. The latents differ between the paths by a
few float32 ulps through the network (well under 1e-5 of their norm), which moves |z - e|^2 by
under 2e-5 (|z|^2 + |e|^2); TIE_TOLERANCE leaves a margin of 5 over that and is still far below
the distance gaps of real choices.
"""

from __future__ import annotations

import numpy as np

TIE_TOLERANCE = 1e-4


def assert_same_codes(got, want, latents, codebook, max_flips: float = 0.02) -> None:
    """got, want: code indices (any shape, the same number M) of latents (M, D), codebook (K, D).
    Identical, except where both codes are equally near up to float32 rounding (TIE_TOLERANCE),
    and at most `max_flips` of the positions."""
    got, want = np.asarray(got).reshape(-1), np.asarray(want).reshape(-1)
    z, e = np.asarray(latents, np.float64).reshape(len(got), -1), np.asarray(codebook, np.float64)
    flips = np.flatnonzero(got != want)
    assert len(flips) <= max_flips * len(got), f"{len(flips)} of {len(got)} codes differ"
    d_got = ((z[flips] - e[got[flips]]) ** 2).sum(1)
    d_want = ((z[flips] - e[want[flips]]) ** 2).sum(1)
    scale = (z[flips] ** 2).sum(1) + (e[want[flips]] ** 2).sum(1)
    assert np.all(np.abs(d_got - d_want) <= TIE_TOLERANCE * scale), (
        f"codes differ beyond float ties at positions {flips.tolist()}: distances {d_got} against {d_want}")
