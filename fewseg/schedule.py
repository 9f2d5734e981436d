"""Per-iteration cosine schedule with warm restarts (method sections 5 and 6), as a pure function of the step.

Each cycle warms up linearly from ``min_lr`` to its peak over ``warmup`` steps, then follows a cosine down to
``min_lr``. The first cycle lasts ``first_cycle`` steps; each next cycle's post-warm-up part is ``cycle_mult`` times
longer, and its peak is ``decay`` times the previous one. Being a pure function of the step, it resumes exactly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fewseg.optim import Optimizer


def lr_at(
    step: int,
    *,
    peak: float,
    min_lr: float = 0.0,
    warmup: int = 0,
    first_cycle: int = 1000,
    cycle_mult: float = 1.0,
    decay: float = 1.0,
) -> float:
    if first_cycle <= warmup:
        raise ValueError("a cycle must be longer than its warm-up")
    cycle, length, pos = 0, first_cycle, step
    while pos >= length:
        pos -= length
        cycle += 1
        length = int((length - warmup) * cycle_mult) + warmup
    top = peak * decay**cycle
    if pos < warmup:
        return min_lr + (top - min_lr) * pos / warmup
    frac = (pos - warmup) / (length - warmup)
    return min_lr + (top - min_lr) * (1 + math.cos(math.pi * frac)) / 2


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Set every parameter group's rate (torch's optimizers and fewseg.optim.AdamW alike)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
