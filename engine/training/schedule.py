"""Learning-rate schedule shared by the Ray Train loop and the experiment harness."""

from __future__ import annotations

import math


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warmup to ``base`` over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))
