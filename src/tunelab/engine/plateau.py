"""Stages that start when a metric plateaus (finetuning-scheduler's idea), at the latest at the
epoch (or step) their strategy gives them.

``strategy.plateau`` turns every stage after the first of a staged strategy into one that
starts as soon as ``monitor`` has not improved (by more than ``min_delta``) for ``patience``
checks in the stage before; the strategy's own start becomes the latest it may start at.
The StageCallback watches the metric and checkpoints this watch (``PlateauWatch``): a stage's
start, once decided, is recorded, so a resumed run lands in the same stage at the same step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Annotated

from omegaconf import DictConfig

from tunelab.config.settings import BOOL, Rule, check_call, choice, integer, number, reads, text

PLATEAU = Rule(lambda v: v is None or isinstance(v, (Mapping, DictConfig)),
               "null or a mapping like {monitor: val/loss, patience: 2}")


@dataclass(frozen=True)
class Plateau:
    monitor: str
    mode: str = "min"
    patience: int = 2
    min_delta: float = 0.0
    restore_best: bool = False

    def improves(self, value: float, best: float | None) -> bool:
        """As Lightning's EarlyStopping: better than ``best`` by more than ``min_delta``; NaN never is."""
        if math.isnan(value):
            return False
        if best is None:
            return True
        return value < best - self.min_delta if self.mode == "min" else value > best + self.min_delta

    def describe(self, unit: str, latest: int) -> str:
        delta = f", min_delta {self.min_delta:g}" if self.min_delta else ""
        restore = "; first restores the best weights of the stage before" if self.restore_best else ""
        return (f"on plateau of {self.monitor} ({self.mode}, patience {self.patience}{delta}), "
                f"at the latest {unit} {latest}{restore}")


@reads("strategy.plateau", noun="plateau")
def plateau_settings(
    monitor: Annotated[str, text()] = "val/loss", mode: Annotated[str, choice("min", "max")] = "min",
    patience: Annotated[int, integer(1)] = 2, min_delta: Annotated[float, number(0)] = 0.0,
    restore_best: Annotated[bool, BOOL] = False,
) -> Plateau:
    """``strategy.plateau``: what ends the stage before (its monitor stalls for ``patience``
    checks) and whether the next stage starts from that stage's best weights."""
    return Plateau(monitor, mode, patience, float(min_delta), restore_best)


def on_plateau(stages: list, plateau) -> list:
    """``stages`` with every stage after the first started by ``plateau`` (a config mapping, or
    None for fixed starts); each stage's own start becomes the latest it starts at."""
    if plateau is None:
        return stages
    check_call(plateau_settings, plateau, "strategy.plateau", noun="plateau")
    spec = plateau_settings(**{str(k): v for k, v in plateau.items()})
    return [stages[0], *(replace(s, plateau=spec) for s in stages[1:])]


@dataclass
class PlateauWatch:
    """The watch over the stage in force: what the StageCallback checkpoints."""

    stage: int = 0  # the stage in force, whose metric is watched
    best: float | None = None
    bad: int = 0  # checks since ``best`` last improved
    best_epoch: int = -1
    starts: dict[int, int] = field(default_factory=dict)  # plateau stage -> its start (epoch or step)
    weights: dict | None = None  # the model when it reached ``best`` (restore_best only)

    def in_force(self, stages: list) -> list:
        """``stages`` with the recorded starts: what ``stage_at`` reads for a plateau schedule."""
        return [replace(s, start=min(s.start, self.starts[i])) if i in self.starts else s
                for i, s in enumerate(stages)]

    def pending(self, stages: list):
        """The Plateau that decides the next stage's start, or None (fixed, decided or none left)."""
        nxt = self.stage + 1
        if nxt >= len(stages) or nxt in self.starts:
            return None
        return stages[nxt].plateau

    def observe(self, value: float, epoch: int, step: int, stages: list,
                snapshot: Callable[[], dict]) -> int | None:
        """One check of the monitored ``value``; returns the next stage's start when this check
        finds the plateau. ``snapshot`` copies the weights (called when restore_best needs them)."""
        plateau, nxt = self.pending(stages), self.stage + 1
        if plateau.improves(value, self.best):
            self.best, self.bad, self.best_epoch = value, 0, epoch
            self.weights = snapshot() if plateau.restore_best else None
            return None
        self.bad += 1
        if self.bad < plateau.patience:
            return None
        # the next epoch (validation ends an epoch) or the next optimizer step
        start = epoch + 1 if stages[nxt].unit == "epoch" else step
        self.starts[nxt] = min(start, stages[nxt].start)
        return self.starts[nxt]

    def enter(self, index: int, stages: list, epoch: int, step: int) -> dict | None:
        """Stage ``index`` came into force: record the starts of the plateau stages it passed (a
        latest start reached without a plateau) and watch afresh. Returns the weights to restore."""
        if index <= self.stage:
            return None
        for i in range(self.stage + 1, index + 1):
            if stages[i].plateau is not None and i not in self.starts:
                self.starts[i] = epoch if stages[i].unit == "epoch" else step
        restore = stages[index].plateau is not None and stages[index].plateau.restore_best
        best = self.weights if restore else None
        self.stage, self.best, self.bad, self.best_epoch, self.weights = index, None, 0, -1, None
        return best

    def state_dict(self) -> dict:
        return {"stage": self.stage, "best": self.best, "bad": self.bad, "best_epoch": self.best_epoch,
                "starts": dict(self.starts), "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.stage, self.best, self.bad = int(state["stage"]), state["best"], int(state["bad"])
        self.best_epoch, self.weights = int(state["best_epoch"]), state["weights"]
        self.starts = {int(k): int(v) for k, v in state["starts"].items()}
