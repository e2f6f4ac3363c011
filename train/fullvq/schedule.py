"""Learning-rate schedules as multipliers of the peak rate, stateless in the step.

anneal (FVQ's learning annealing): linear warm-up, hold until decay_start of the steps, then linear
decay to final_ratio. fvq: the same shape exactly as FVQ's vq_train_qbridge_lr.py computes it
(sche_type 'lin'): warm-up from 0.5% of the peak, hold for the first decay_start (its lrT) of the
steps after warm-up, then linear decay to final_ratio at the last step. cosine: linear warm-up, then
cosine decay to final_ratio. constant: linear warm-up, then 1.
"""

from __future__ import annotations

import math

SCHEDULES = ("anneal", "fvq", "cosine", "constant")
FVQ_WARMUP_START = 0.005  # vq_train_qbridge_lr.py's wp0


def lr_factor(step: int, steps: int, schedule: str = "anneal", warmup: float = 0.05, decay_start: float = 0.5,
              final_ratio: float = 0.01) -> float:
    if schedule == "fvq":
        return _fvq_lin(step, steps, round(warmup * steps), decay_start, final_ratio)
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
        raise ValueError(f"unknown schedule {schedule!r}: expected one of {list(SCHEDULES)}")
    return 1.0 - (1.0 - final_ratio) * min(t, 1.0)


def _fvq_lin(step: int, steps: int, warm: int, hold: float, final_ratio: float) -> float:
    """FVQ's combined_lr_lambda with sche_type 'lin' (warm = warmup_ep x len(loader), hold = lrT)."""
    if step < warm:
        return FVQ_WARMUP_START + (1 - FVQ_WARMUP_START) * step / max(1, warm)
    done = (step - warm) / max(1, steps - 1 - warm)
    if done < hold:
        return 1.0
    return final_ratio + (1 - final_ratio) * (1 - done) / (1 - hold)
