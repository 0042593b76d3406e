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


class PauseAt(L.Callback):
    """At each step in ``steps``: write ``<folder>/paused_<step>`` and wait for ``<folder>/go_<step>``,
    so a test can change the world (stop a server) at a known point of training."""

    def __init__(self, folder: str, steps: list[int], timeout: float = 180.0):
        from pathlib import Path

        self.folder, self.steps, self.timeout = Path(folder), set(steps), timeout

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        import time

        step = trainer.global_step
        if step not in self.steps:
            return
        self.steps.discard(step)
        (self.folder / f"paused_{step}").touch()
        deadline = time.monotonic() + self.timeout
        while not (self.folder / f"go_{step}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)


class SlowSteps(L.Callback):
    """Sleeps after every optimizer step for ``$TUNELAB_PROBE_STEP_S`` seconds (0 when unset): a
    long job whose pace the test sets per attempt, outside the config (and so the recipe)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        import time

        time.sleep(float(os.environ.get("TUNELAB_PROBE_STEP_S", "0")))
