"""Callbacks the DDP tests inject through the config (a user-declared _target_ prefix)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class SaveRankWeights(L.Callback):
    """Each rank writes the weights it ended training with: the test compares the ranks."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_end(self, trainer, pl_module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
        torch.save(state, self.folder / f"weights_rank{trainer.global_rank}.pt")


class FailOnRank(L.Callback):
    """One rank raises at the start of an epoch, as a real bug on one worker would."""

    def __init__(self, rank: int, epoch: int = 1):
        self.rank, self.epoch = rank, epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.global_rank == self.rank and trainer.current_epoch == self.epoch:
            raise RuntimeError(f"injected failure on rank {self.rank}")
