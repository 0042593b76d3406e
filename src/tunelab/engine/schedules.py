"""Learning-rate shapes: ``(step, total_steps) -> factor``, mostly in [0, 1].

The module multiplies a shape by each group's stage multiplier and layer scale inside one
LambdaLR lambda per param group. That is why per-group multipliers (stages, layer decay)
work under every shape here, unlike timm's ``lr_scale`` which only timm's schedulers honour.
Configs reference the functions with ``_partial_: true``; ``Plateau`` is an object because
it reacts to validation metrics.
"""

from __future__ import annotations

import math
from typing import Annotated

from tunelab.config.settings import POSITIVE, checked, choice, integer, number, text

WARMUP = number(0)  # below 1: a fraction of the run; from 1: a number of steps
RATIO = number(0, 1)
OPEN_FRACTION = number(0, 1, low_open=True, high_open=True)


def _warmup_steps(warmup: float, total_steps: int) -> int:
    # A value below 1 is a fraction of the run; 1 or more is a number of steps.
    return int(warmup * total_steps) if 0 < warmup < 1 else int(warmup)


def _warmup_or_progress(step: int, total_steps: int, warmup: float) -> tuple[float | None, float]:
    """``(linear warmup factor, 0)`` during warmup, then ``(None, progress in [0, 1])``."""
    w = _warmup_steps(warmup, total_steps)
    if step < w:
        return (step + 1) / w, 0.0
    return None, min(1.0, (step - w) / max(1, total_steps - w))


def constant(step: int, total_steps: int, warmup: Annotated[float, WARMUP] = 0) -> float:
    ramp, _ = _warmup_or_progress(step, total_steps, warmup)
    return 1.0 if ramp is None else ramp


def warmup_cosine(step: int, total_steps: int, warmup: Annotated[float, WARMUP] = 0.05,
                  min_lr_ratio: Annotated[float, RATIO] = 0.0) -> float:
    ramp, progress = _warmup_or_progress(step, total_steps, warmup)
    if ramp is not None:
        return ramp
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def linear(step: int, total_steps: int, warmup: Annotated[float, WARMUP] = 0.05,
           min_lr_ratio: Annotated[float, RATIO] = 0.0) -> float:
    """Warmup, then a straight line down to ``min_lr_ratio`` at the last step."""
    ramp, progress = _warmup_or_progress(step, total_steps, warmup)
    return ramp if ramp is not None else 1.0 - (1.0 - min_lr_ratio) * progress


def one_cycle(step: int, total_steps: int, pct_start: Annotated[float, OPEN_FRACTION] = 0.3,
              div_factor: Annotated[float, POSITIVE] = 25.0, final_div_factor: Annotated[float, POSITIVE] = 1e4) -> float:
    """Smith's one-cycle with cosine annealing, as torch's OneCycleLR (anneal_strategy="cos")."""
    peak = max(1.0, pct_start * total_steps - 1)
    start, end = 1.0 / div_factor, 1.0 / (div_factor * final_div_factor)
    if step <= peak:
        return start + (1.0 - start) * 0.5 * (1 - math.cos(math.pi * step / peak))
    progress = min(1.0, (step - peak) / max(1.0, total_steps - 1 - peak))
    return end + (1.0 - end) * 0.5 * (1 + math.cos(math.pi * progress))


def slanted_triangular(step: int, total_steps: int, cut_frac: Annotated[float, OPEN_FRACTION] = 0.1,
                       ratio: Annotated[float, number(1)] = 32.0) -> float:
    """ULMFiT's slanted triangular LR (Howard & Ruder 2018): short rise, long linear decay."""
    cut = max(1, math.floor(total_steps * cut_frac))
    p = step / cut if step < cut else 1 - (step - cut) / max(1, cut * (1 / cut_frac - 1))
    return (1 + max(0.0, p) * (ratio - 1)) / ratio


class Plateau:
    """Reduce on plateau as a shape: ``factor`` × the LR whenever ``monitor`` stops improving
    for ``patience`` validations. The module calls ``update`` after each validation; the
    state travels in the checkpoint."""

    @checked("scheduler")
    def __init__(self, monitor: Annotated[str, text()] = "val/loss", mode: Annotated[str, choice("min", "max")] = "min",
                 factor: Annotated[float, OPEN_FRACTION] = 0.1, patience: Annotated[int, integer(0)] = 1,
                 min_scale: Annotated[float, number(0, 1, low_open=True)] = 1e-4,
                 threshold: Annotated[float, number(0)] = 1e-4, warmup: Annotated[float, WARMUP] = 0):
        self.monitor, self.mode, self.factor, self.patience = monitor, mode, factor, patience
        self.min_scale, self.threshold, self.warmup = min_scale, threshold, warmup
        self.scale, self.best, self.bad = 1.0, None, 0

    def __call__(self, step: int, total_steps: int) -> float:
        return constant(step, total_steps, self.warmup) * self.scale

    def update(self, value: float) -> None:
        better = self.best is None or (
            value < self.best - self.threshold if self.mode == "min" else value > self.best + self.threshold
        )
        if better:
            self.best, self.bad = value, 0
            return
        self.bad += 1
        if self.bad > self.patience - 1:
            self.scale, self.bad = max(self.min_scale, self.scale * self.factor), 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.best, self.bad = state["scale"], state["best"], state["bad"]
