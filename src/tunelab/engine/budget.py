"""The training budget tunelab plans stages against: epochs, batches per epoch, optimizer steps.

``trainer`` is Lightning's Trainer, whose own checks run only when it is built, after the run
exists; the settings tunelab itself reads to plan the schedule are declared here.
"""

from __future__ import annotations

from typing import Annotated

from omegaconf import DictConfig, open_dict

from tunelab.config.settings import BATCHES, TRAIN_BATCHES, integer, number, reads
from tunelab.engine.strategies import Stage, compress
from tunelab.errors import TunelabError


@reads("trainer", closed=False)  # Trainer's signature checks the keys; these are the values planned with
def trainer_budget(
    max_epochs: Annotated[int, integer(1)],
    limit_train_batches: Annotated[float | int | None, TRAIN_BATCHES] = None,
    limit_val_batches: Annotated[float | int | None, BATCHES] = None,
    limit_test_batches: Annotated[float | int | None, BATCHES] = None,
    accumulate_grad_batches: Annotated[int, integer(1)] = 1,
    log_every_n_steps: Annotated[int, integer(1)] = 50,
    gradient_clip_val: Annotated[float | None, number(0, null=True)] = None,
) -> None:
    """The ``trainer`` settings the stage plan and the batch limits rely on."""


def full_epochs(limit) -> bool:
    return limit is None or (isinstance(limit, float) and limit == 1.0)  # Lightning: int 1 = one batch


def check_train_fraction(limit, datamodule) -> None:
    """A fraction of the training batches that rounds to none would stop Lightning mid-fit."""
    if not isinstance(limit, float) or not 0 < limit < 1:
        return
    batches = train_batches(datamodule)
    if int(batches * limit) == 0:
        raise TunelabError(f"trainer.limit_train_batches={limit} of {batches} training batches is none; "
                           f"use at least {1 / batches:.3g} or a number of batches (e.g. 1).")


def train_batches(datamodule) -> int:
    """Batches in one full pass over the training split (the last one may be short)."""
    return -(-datamodule.split_sizes()["train"] // datamodule.batch_size)


def steps_per_epoch(cfg: DictConfig, datamodule) -> int:
    """Optimizer steps in one training epoch, as Lightning will count them."""
    batches = train_batches(datamodule)
    limit = cfg.trainer.get("limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool):
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = max(1, int(batches * limit))
    return max(1, -(-batches // int(cfg.trainer.get("accumulate_grad_batches") or 1)))


def fit_schedule(cfg: DictConfig, stages: list[Stage], datamodule) -> tuple[list[Stage], tuple[str, ...]]:
    """``compress_stages`` (debug=smoke): a schedule longer than the run is squeezed to one
    optimizer step per stage, and trainer.max_epochs raised as far as that needs."""
    if not cfg.get("compress_stages"):
        return stages, ()
    epochs = int(cfg.trainer.max_epochs)
    squeezed, needed = compress(stages, epochs, steps_per_epoch(cfg, datamodule), "compressed by debug=smoke")
    if squeezed is stages:
        return stages, ()
    with open_dict(cfg):
        cfg.trainer.max_epochs = needed
    was = stages[-1]
    return squeezed, (f"debug=smoke compressed the schedule (its last stage starts at {was.unit} {was.start}, "
                      f"beyond trainer.max_epochs={epochs}): each stage now starts one optimizer step after the "
                      f"one before, over {needed} epoch(s).",)
