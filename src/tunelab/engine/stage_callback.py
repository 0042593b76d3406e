"""The callback that runs a strategy's stages during ``Trainer.fit``."""

from __future__ import annotations

import logging
import time

import lightning as L

from tunelab.engine.distributed import rewrap_ddp
from tunelab.engine.plateau import PlateauWatch
from tunelab.engine.strategies import stage_at
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)


class StageCallback(L.Callback):
    """Before every training batch, put the module in the stage its epoch/step calls for.

    The stage is a function of (epoch, step), so a resumed run lands in the same stage; the
    stage's own start step comes back from the checkpoint, so a re-warmup resumed mid-stage
    continues where it was. Unlike Lightning's BaseFinetuning, nothing is re-frozen or
    re-added on resume: the optimizer layout never changes.

    A plateau stage (plateau.py) starts at the start recorded when its metric plateaued: the
    watch is this callback's checkpointed state, and is updated where ModelCheckpoint saves
    (``_decides_at_epoch_end``), so a last.ckpt holds the decision of its own epoch.
    """

    def __init__(self):
        self.applied = -1  # the stage index applied in this process
        self.wrapped: frozenset[str] = frozenset()  # what DDP's wrapper syncs (rewrap_ddp)
        self.plateaus = PlateauWatch()

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if stage == "fit":  # before configure_optimizers and the model summary see the model
            pl_module.set_stage(0, start_step=0)
            self.applied = -1
            self.wrapped = _trainable(pl_module)  # Lightning wraps DDP after this hook
            self.plateaus = PlateauWatch()  # a resumed run loads its own after this hook

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
        index = stage_at(self.plateaus.in_force(pl_module.stages), trainer.current_epoch, trainer.global_step)
        if index == self.applied:
            return
        best_epoch = self.plateaus.best_epoch
        best = self.plateaus.enter(index, pl_module.stages, trainer.current_epoch, trainer.global_step)
        if best is not None:  # restore_best: the next stage starts from the stage before's best epoch
            pl_module.model.load_state_dict(best)
            log.info("restored the weights of epoch %d, the best of the stage before (restore_best)", best_epoch)
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

    # -- plateau stages: one check per validation, where last.ckpt is written ------------------
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if _decides_at_epoch_end(trainer):
            self._check_plateau(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit" and not _decides_at_epoch_end(trainer):
            self._check_plateau(trainer, pl_module)

    def _check_plateau(self, trainer: L.Trainer, pl_module) -> None:
        plateau = self.plateaus.pending(pl_module.stages)
        if plateau is None:
            return
        metrics = trainer.callback_metrics
        if plateau.monitor not in metrics:
            raise TunelabError(f"strategy.plateau.monitor={plateau.monitor!r} is not a logged metric; "
                               f"logged: {sorted(metrics)}.")
        # every rank decides what rank 0 decides (the value is synced already; this makes it exact)
        value = trainer.strategy.broadcast(float(metrics[plateau.monitor]), src=0)
        start = self.plateaus.observe(value, trainer.current_epoch, trainer.global_step, pl_module.stages,
                                      lambda: _copy(pl_module.model))
        if start is not None:
            stage = pl_module.stages[self.plateaus.stage + 1]
            log.info("%s=%.4g has not improved on %.4g (epoch %d) for %d check(s): stage %r starts at %s %d",
                     plateau.monitor, value, self.plateaus.best, self.plateaus.best_epoch, self.plateaus.bad,
                     stage.name, stage.unit, start)

    def state_dict(self) -> dict:
        return self.plateaus.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.plateaus.load_state_dict(state_dict)


def _decides_at_epoch_end(trainer: L.Trainer) -> bool:
    """Whether ModelCheckpoint saves at the training epoch's end (its _should_save_on_train_epoch_end)
    rather than at the validation's end: the plateau is checked in the same hook, before it saves."""
    if getattr(trainer, "_val_check_time_interval", None) is not None or trainer.check_val_every_n_epoch != 1:
        return False
    batches = trainer.num_val_batches
    return (sum(batches) if isinstance(batches, list) else batches) == 0 or trainer.val_check_interval == 1.0


def _copy(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _trainable(module) -> frozenset[str]:
    return frozenset(n for n, p in module.named_parameters() if p.requires_grad)
