"""A scripted metric for the plateau-stage tests: the value each epoch logs is the test's, so the
epoch a plateau stage must start at is known in advance. Also records what the tests compare."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class ScriptedMetric(L.Callback):
    """Logs ``history[epoch]`` as ``name`` at each validation end (ranks >= 1 log ``rank_history``
    when given, unsynced: ranks deciding on their own values would disagree), and records per
    epoch the stage in force, the weights after the epoch's training and those its first batch
    trained from; ``report`` gets each rank's stages as JSON."""

    def __init__(self, history: list[float], name: str = "probe/score", rank_history: list[float] | None = None,
                 report: str | None = None):
        self.history, self.name = list(history), name
        self.rank_history = list(rank_history) if rank_history is not None else None
        self.report = Path(report) if report else None
        self.stages: dict[int, int] = {}
        self.end_weights: dict[int, dict] = {}
        self.start_weights: dict[int, dict] = {}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        history = self.rank_history if trainer.global_rank and self.rank_history is not None else self.history
        pl_module.log(self.name, history[trainer.current_epoch])  # no sync_dist: the ranks' values differ
        self.end_weights[trainer.current_epoch] = _copy(pl_module.model)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        # runs after the StageCallback's hook (core callbacks come first): the stage this batch trains in
        if batch_idx == 0:
            self.stages[trainer.current_epoch] = pl_module.stage_index
            self.start_weights[trainer.current_epoch] = _copy(pl_module.model)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.report is not None:
            self.report.mkdir(parents=True, exist_ok=True)
            stages = {"stages": self.stages, "stage_log": pl_module.stage_log}
            (self.report / f"rank{trainer.global_rank}.json").write_text(json.dumps(stages))


def _copy(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
