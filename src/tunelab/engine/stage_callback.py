"""The callback that runs a strategy's stages during ``Trainer.fit``."""

from __future__ import annotations

import logging
import time

import lightning as L

from tunelab.engine.distributed import rewrap_ddp
from tunelab.engine.strategies import stage_at
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)


class StageCallback(L.Callback):
    """Before every training batch, put the module in the stage its epoch/step calls for.

    The stage is a function of (epoch, step), so a resumed run lands in the same stage; the
    stage's own start step comes back from the checkpoint, so a re-warmup resumed mid-stage
    continues where it was. Unlike Lightning's BaseFinetuning, nothing is re-frozen or
    re-added on resume: the optimizer layout never changes.
    """

    def __init__(self):
        self.applied = -1  # the stage index applied in this process
        self.wrapped: frozenset[str] = frozenset()  # what DDP's wrapper syncs (rewrap_ddp)

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if stage == "fit":  # before configure_optimizers and the model summary see the model
            pl_module.set_stage(0, start_step=0)
            self.applied = -1
            self.wrapped = _trainable(pl_module)  # Lightning wraps DDP after this hook

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.is_global_zero:
            log.info("training: %d epoch(s), %d optimizer steps", trainer.max_epochs, trainer.estimated_stepping_batches)
        last = pl_module.stages[-1]
        if last.unit == "step" and last.start >= trainer.estimated_stepping_batches:
            raise TunelabError(
                f"stage {last.name!r} starts at step {last.start} but the run has only "
                f"{trainer.estimated_stepping_batches} optimizer steps; start it earlier or train longer."
            )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        index = stage_at(pl_module.stages, trainer.current_epoch, trainer.global_step)
        if index == self.applied:
            return
        restored = getattr(pl_module, "restored_stage", None)
        start = restored[1] if restored and restored[0] == index else trainer.global_step
        stage = pl_module.set_stage(index, start_step=start)
        started = time.perf_counter()
        if _trainable(pl_module) != self.wrapped and rewrap_ddp(trainer):
            self.wrapped = _trainable(pl_module)
            log.info("ddp: re-wrapped the model for stage %r in %.2f s (its parameters are all-reduced from now on)",
                     stage.name, time.perf_counter() - started)
        if self.applied >= 0 or index > 0:
            trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            log.info("epoch %d step %d: stage %r, training %s (%s parameters)", trainer.current_epoch,
                     trainer.global_step, stage.name, ", ".join(stage.trainable + stage.patterns), f"{trainable:,}")
        self.applied = index


def _trainable(module) -> frozenset[str]:
    return frozenset(n for n, p in module.named_parameters() if p.requires_grad)
