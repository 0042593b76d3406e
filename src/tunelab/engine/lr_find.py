"""``tunelab-train tune=lr_find``: the LR range test (Smith 2017; fastai's and Lightning's ``lr_find``)
over tunelab's own optimizer.

Lightning's ``Tuner.lr_find`` sets every param group to one LR, which loses the stage and layer
multipliers. Here the sweep is the module's schedule shape (``lr_shape``) like any other, so each
group trains at ``lr_at(step) × stage_mult × layer_scale`` and keeps its ratio to the others: the
suggestion is a base LR, the ``optimizer.lr`` of a run with the same strategy and multipliers.

Only the first stage trains (what a run's first steps train), nothing is validated or
checkpointed, and the weights are dropped with the process: the MLflow run of its own (tag
``tunelab.kind=lr_find``, experiment ``<name>-lr_find``) holds the curve, the plots and the suggestion.
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import lightning as L
import numpy as np
from omegaconf import DictConfig, open_dict

from tunelab.config import build
from tunelab.config.settings import FRACTION, POSITIVE, checked, integer, number
from tunelab.engine.budget import steps_per_epoch
from tunelab.engine.build import build_parts
from tunelab.engine.distributed import is_ddp
from tunelab.engine.stage_callback import StageCallback
from tunelab.errors import TunelabError
from tunelab.tracking.plots import figure, save
from tunelab.tracking.runs import mlflow_run

# What a range test changes in the run's trainer: a number of steps (and the epochs they take), no
# validation, no checkpoint, one device (a loss curve needs no data parallelism)
SWEEP_TRAINER = dict(min_epochs=None, min_steps=None, limit_val_batches=0, num_sanity_val_steps=0,
                     enable_checkpointing=False, logger=False)
ONE_DEVICE = dict(devices=1, num_nodes=1, strategy="auto")


class LRFinder:
    """The settings of ``tune=lr_find`` (conf/tune/lr_find.yaml) and the LR they sweep."""

    @checked("tune")
    def __init__(self, min_lr: Annotated[float, POSITIVE] = 1e-7, max_lr: Annotated[float, POSITIVE] = 1.0,
                 steps: Annotated[int, integer(3)] = 100, diverge: Annotated[float, number(1, low_open=True)] = 4.0,
                 smoothing: Annotated[float, FRACTION] = 0.98):
        if min_lr >= max_lr:
            raise TunelabError(f"tune.min_lr ({min_lr:g}) must be below tune.max_lr ({max_lr:g}): "
                               "the range test sweeps the LR up from one to the other.")
        self.min_lr, self.max_lr, self.steps = float(min_lr), float(max_lr), int(steps)
        self.diverge, self.smoothing = float(diverge), float(smoothing)

    def lr_at(self, step: int) -> float:
        """The base LR of optimizer step ``step``: exponential from min_lr (step 0) to max_lr (the last)."""
        return self.min_lr * (self.max_lr / self.min_lr) ** (min(step, self.steps - 1) / (self.steps - 1))

    def shape(self, base_lr: float):
        """The module's ``lr_shape`` whose product with ``base_lr`` (optimizer.lr) is ``lr_at``."""
        return lambda step, total_steps: self.lr_at(step) / base_lr


class RangeRecorder(L.Callback):
    """Each optimizer step's LR and loss, the loss smoothed as fastai's and Lightning's finders do;
    stops the sweep at a non-finite loss or once the smoothed loss passes ``diverge`` × its best."""

    def __init__(self, finder: LRFinder):
        self.finder = finder
        self.lrs: list[float] = []
        self.raw: list[float] = []
        self.smoothed: list[float] = []
        self.stopped = ""  # why the sweep ended before max_lr, if it did
        self._window, self._average = 0.0, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Lightning divides each micro-batch's loss by accumulate_grad_batches: the window sums to the step's mean
        self._window += float(outputs["loss"])
        step = trainer.global_step - 1  # the optimizer step just taken, at lr_at(step)
        if step < len(self.lrs):  # mid-accumulation: no step yet
            return
        loss, self._window = self._window, 0.0
        lr = self.finder.lr_at(step)
        if not math.isfinite(loss):
            self._stop(trainer, f"the loss became {loss} at LR {lr:.2g}")
            return
        beta = self.finder.smoothing
        self._average = beta * self._average + (1 - beta) * loss
        smooth = self._average / (1 - beta ** (len(self.lrs) + 1))  # bias-corrected, as Adam's moments
        self.lrs.append(lr)
        self.raw.append(loss)
        self.smoothed.append(smooth)
        if len(self.smoothed) > 1 and smooth > self.finder.diverge * min(self.smoothed):
            self._stop(trainer, f"the smoothed loss passed {self.finder.diverge:g} x its lowest at LR {lr:.2g}")

    def ended(self) -> str:
        return f"stopped early: {self.stopped}" if self.stopped else f"reached tune.max_lr={self.finder.max_lr:g}"

    def _stop(self, trainer, why: str) -> None:
        self.stopped = why
        trainer.should_stop = True


class _Unwatched:
    """A range test ends by driving the loss to divergence on purpose: the recorder stops the
    sweep there, where the module's LossWatch would fail the run."""

    def add(self, *args) -> None:
        pass

    def check(self, *args) -> None:
        pass


def steepest(lrs: list[float], losses: list[float], skip_begin: int, skip_end: int = 1) -> float | None:
    """The LR where the loss falls fastest against log LR (fastai's ``steep``, Lightning's
    ``suggestion``), skipping the first points (the average still settling) and the last (the
    divergence that stopped the sweep). Only up to the loss's lowest point: past it training is
    diverging, and a drop there is chaos (seen on tiny data: a spike, then a steeper fall at 30x
    the LR where the loss fell before). None when the loss never falls."""
    kept = slice(skip_begin, len(lrs) - skip_end)
    lrs_, losses_ = np.asarray(lrs, float)[kept], np.asarray(losses, float)[kept]
    if len(lrs_) < 3:
        return None
    slope = np.gradient(losses_, np.log(lrs_))[: int(np.argmin(losses_)) + 1]
    return float(lrs_[np.argmin(slope)]) if slope.min() < 0 else None


def override(lr: float) -> str:
    return f"optimizer.lr={lr:.1e}"


@dataclass
class RangeTest:
    """What ``find_lr`` measured, and the MLflow run that holds it."""

    run: object  # tracking.runs.Run
    finder: LRFinder
    stage: str
    trains: str
    recorder: RangeRecorder
    suggested: float | None
    lr_history: list = field(default_factory=list)  # (step, LR per layer group), as a training run logs it

    def summary(self) -> str:
        rec = self.recorder
        lines = [f"LR range test, run {self.run.run_id}: {len(rec.lrs)} steps of stage {self.stage!r} "
                 f"(training {self.trains}) from LR {self.finder.min_lr:g}; {rec.ended()}"]
        if self.suggested is not None:
            lines += [f"suggested (steepest descent of the smoothed loss): {override(self.suggested)}",
                      "  look at lr_find.png before trusting it: the loss should still fall well beyond it"]
        return "\n".join(lines)


def find_lr(cfg: DictConfig, finder: LRFinder) -> RangeTest:
    """Build the run's parts as training would, sweep the first stage's LR, log it in its own run."""
    for key in ("ckpt_path", "resume"):
        if cfg.get(key):
            raise TunelabError(f"tune=lr_find starts from the model's initial weights and leaves no run to resume: "
                               f"drop {key}= (init_from=<trained model> starts it from a trained model).")
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    parts = build_parts(_without_retention(cfg))
    module, stage = parts.module, parts.stages[0]
    module.stages = [stage]  # the first stage only: no later unfreeze, however many epochs the steps take
    module.lr_shape = finder.shape(parts.base_lr)
    module.loss_watch = _Unwatched()
    recorder = RangeRecorder(finder)
    with mlflow_run(cfg, run_name=cfg.get("run_name"), kind="lr_find") as run:
        run.log_text(f"{parts.stage_table()}\nthe range test trains stage {stage.name!r} only", "stage_table.txt")
        epochs = -(-finder.steps // steps_per_epoch(cfg, parts.datamodule))
        trainer = build(cfg.trainer, "trainer", callbacks=[StageCallback(), recorder], max_steps=finder.steps,
                        max_epochs=epochs, **SWEEP_TRAINER, **(ONE_DEVICE if is_ddp(cfg) else {}))
        try:
            trainer.fit(module, datamodule=parts.datamodule)
        except SystemExit:  # Lightning turns Ctrl+C into sys.exit(1): the run ends KILLED, not FAILED
            if trainer.interrupted:
                raise KeyboardInterrupt("range test interrupted") from None
            raise
        suggested = steepest(recorder.lrs, recorder.smoothed, skip_begin=max(1, finder.steps // 10))
        _log(run, recorder, suggested, module)
        if suggested is None:
            raise TunelabError(f"the range test found no LR where the loss falls ({len(recorder.lrs)} steps from "
                               f"{finder.min_lr:g}; {recorder.ended()}): widen tune.min_lr..tune.max_lr or raise "
                               f"tune.steps, and look at lr_find.png in run {run.run_id}.")
    trains = ", ".join(stage.trainable + stage.patterns) or "nothing"
    return RangeTest(run, finder, stage.name, trains, recorder, suggested, module.lr_history)


def _without_retention(cfg: DictConfig) -> DictConfig:
    """The config to build from: no copy of the pretrained model to measure retention against."""
    built = copy.deepcopy(cfg)
    with open_dict(built):
        if built.get("retention"):
            built.retention.enabled = False
    return built


def _log(run, recorder: RangeRecorder, suggested: float | None, module) -> None:
    logger = run.lightning_logger()
    for step, (lr, raw, smooth) in enumerate(zip(recorder.lrs, recorder.raw, recorder.smoothed)):
        logger.log_metrics({"lr_find/lr": lr, "lr_find/loss": raw, "lr_find/smoothed_loss": smooth}, step=step)
    if suggested is not None:
        run.log_metrics({"lr_find/suggested_lr": suggested})
    run.log_lr_history(module.lr_history, module.stage_log)  # every group's LR: the multipliers kept
    with tempfile.TemporaryDirectory() as tmp:
        run.log_artifact(plot_range_test(recorder, suggested, Path(tmp) / "lr_find.png"))


def plot_range_test(recorder: RangeRecorder, suggested: float | None, path: Path) -> Path:
    """Loss against LR on a log axis: each step's loss, the smoothed curve and the suggestion."""
    fig, ax = figure((7, 4.5))
    lrs, smoothed = recorder.lrs, recorder.smoothed
    ax.plot(lrs, recorder.raw, color="lightgrey", linewidth=0.8, label="loss per step")
    ax.plot(lrs, smoothed, color="tab:blue", linewidth=1.5, label=f"smoothed (beta {recorder.finder.smoothing:g})")
    if suggested is not None:
        ax.axvline(suggested, color="tab:red", linestyle="--", linewidth=1)
        ax.plot([suggested], [smoothed[lrs.index(suggested)]], "o", color="tab:red", label=override(suggested))
    if smoothed:  # the diverging tail would flatten the part worth reading
        low, high = min(*smoothed, *recorder.raw), smoothed[0]
        span = (high - low) or abs(high) or 1.0
        ax.set_ylim(low - 0.1 * span, high + 0.5 * span)
    ax.set_xscale("log")
    ax.set_xlabel("optimizer.lr (each group at its multiplier times this)")
    ax.set_ylabel("training loss")
    ax.set_title("LR range test: pick an LR where the loss still falls steeply")
    ax.legend(fontsize=8)
    return save(fig, path)
