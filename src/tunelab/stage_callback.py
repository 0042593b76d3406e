"""The callback that runs a strategy's stages during ``Trainer.fit``."""

from __future__ import annotations

import logging

import lightning as L

from tunelab.strategies import stage_at

log = logging.getLogger(__name__)


class StageCallback(L.Callback):
    """At each epoch start, put the module in the stage its epoch calls for.

    The stage is a function of the epoch, so a resumed run lands in the same stage with the
    same trainable set and multipliers; the index is also saved in the checkpoint as a record.
    """

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if stage == "fit":  # before configure_optimizers and the model summary see the model
            pl_module.set_stage(0)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        index = stage_at(pl_module.stages, trainer.current_epoch)
        if index == pl_module.stage_index:
            return
        stage = pl_module.set_stage(index)
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        log.info("epoch %d: stage %r starts, training %s (%s parameters)",
                 trainer.current_epoch, stage.name, ", ".join(stage.trainable), f"{trainable:,}")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["tunelab_stage_index"] = pl_module.stage_index
