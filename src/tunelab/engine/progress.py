"""The training progress bar: the run's objective where Lightning shows ``v_num``."""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class ObjectiveProgressBar(TQDMProgressBar):
    """Lightning's bar shows the logger's version (``v_num``: an MLflow run id prefix, meaningless
    next to a loss); a fine-tuner watches the metric the checkpoints and sweeps follow.

    The objective is read once per validation, not at every refresh: reading a GPU tensor on the
    host waits for the GPU, and a wait at every step keeps the host from queuing the next one."""

    def __init__(self, objective: str | None):
        super().__init__()
        self.objective, self.shown_objective = objective, None

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        value = trainer.callback_metrics.get(self.objective) if self.objective else None
        if value is not None and not trainer.sanity_checking:
            self.shown_objective = f"{float(value):.4f}"

    def get_metrics(self, trainer, pl_module) -> dict:
        shown = super().get_metrics(trainer, pl_module)
        shown.pop("v_num", None)
        if self.shown_objective is not None:
            shown[self.objective] = self.shown_objective
        return shown
