"""Learning-rate shapes: pure functions ``(step, total_steps) -> factor`` in [0, 1].

The module turns a shape into one LambdaLR lambda per param group, multiplied by that
group's stage multiplier. That is why layer-wise multipliers work with every shape
here (timm's ``lr_scale`` works only with timm's own schedulers).
Configs reference them with ``_partial_: true``.
"""

from __future__ import annotations

import math


def _warmup_steps(warmup: float, total_steps: int) -> int:
    # A value below 1 is a fraction of the run; 1 or more is a number of steps.
    return int(warmup * total_steps) if 0 < warmup < 1 else int(warmup)


def constant(step: int, total_steps: int, warmup: float = 0) -> float:
    w = _warmup_steps(warmup, total_steps)
    return min(1.0, (step + 1) / w) if w else 1.0


def warmup_cosine(step: int, total_steps: int, warmup: float = 0.05, min_lr_ratio: float = 0.0) -> float:
    w = _warmup_steps(warmup, total_steps)
    if step < w:
        return (step + 1) / w
    progress = min(1.0, (step - w) / max(1, total_steps - w))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
