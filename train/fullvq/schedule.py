"""Learning-rate schedules as multipliers of the peak rate, stateless in the step.

anneal (FVQ's learning annealing): linear warm-up, hold, then linear decay to final_ratio.
cosine: linear warm-up, then cosine decay to final_ratio. constant: linear warm-up, then 1.
"""

from __future__ import annotations

import math


def lr_factor(step: int, steps: int, schedule: str = "anneal", warmup: float = 0.05, decay_start: float = 0.5,
              final_ratio: float = 0.01) -> float:
    warm = max(1, round(warmup * steps))
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    if schedule == "anneal":
        start = max(warm, round(decay_start * steps))
        if step < start:
            return 1.0
        t = (step - start) / max(1, steps - 1 - start)
    elif schedule == "cosine":
        t = (step - warm) / max(1, steps - 1 - warm)
        t = (1 - math.cos(math.pi * min(t, 1.0))) / 2
    else:
        raise ValueError(f"unknown schedule {schedule!r}: expected 'anneal', 'cosine' or 'constant'")
    return 1.0 - (1.0 - final_ratio) * min(t, 1.0)
