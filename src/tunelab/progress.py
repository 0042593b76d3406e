"""The training progress bar: the run's objective where Lightning shows ``v_num``."""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class ObjectiveProgressBar(TQDMProgressBar):
    """Lightning's bar shows the logger's version (``v_num``: an MLflow run id prefix, meaningless
    next to a loss); a fine-tuner watches the metric the checkpoints and sweeps follow."""

    def __init__(self, objective: str | None):
        super().__init__()
        self.objective = objective

    def get_metrics(self, trainer, pl_module) -> dict:
        shown = super().get_metrics(trainer, pl_module)
        shown.pop("v_num", None)
        value = trainer.callback_metrics.get(self.objective) if self.objective else None
        if value is not None:
            shown[self.objective] = f"{float(value):.4f}"
        return shown
