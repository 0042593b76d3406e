"""Faults the reliability tests inject through the config (a user-declared _target_ prefix)."""

from __future__ import annotations

import os
import signal

import lightning as L


class SigtermAt(L.Callback):
    """Sends this process SIGTERM after optimizer step ``step``, as a scheduler pre-empting it would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class NanAt(L.Callback):
    """Poisons the head's weights before optimizer step ``step``: the loss turns NaN, as with a too-high LR."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            for p in pl_module.model.get_classifier().parameters():
                p.data.fill_(float("nan"))
