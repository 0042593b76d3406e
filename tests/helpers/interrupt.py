"""A pre-empted job, in-process: save a checkpoint after a given optimizer step, then die."""

from __future__ import annotations

import lightning as L


class Interrupt(Exception):
    pass


class StopAt(L.Callback):
    """Save a checkpoint after optimizer step ``step`` and die, like a pre-empted job."""

    def __init__(self, step: int, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise Interrupt()
