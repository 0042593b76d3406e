"""The progress bar shows the run's objective without reading a device tensor at every step."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from tunelab.engine.progress import ObjectiveProgressBar


class _Trainer:
    sanity_checking = False

    def __init__(self, value):
        self.callback_metrics = {"val/acc": value}


class _CountedReads(torch.Tensor):
    """A metric whose host reads are counted (a read of a CUDA tensor waits for the GPU)."""

    reads = 0

    def __float__(self):
        type(self).reads += 1
        return super().__float__()


def test_the_objective_is_read_once_per_validation_not_per_refresh(monkeypatch):
    monkeypatch.setattr(TQDMProgressBar, "get_metrics", lambda self, trainer, module: {"v_num": "ab12", "train/loss": 0.5})
    monkeypatch.setattr(TQDMProgressBar, "on_validation_end", lambda self, trainer, module: None)
    bar, trainer = ObjectiveProgressBar("val/acc"), _Trainer(torch.tensor(0.875).as_subclass(_CountedReads))
    assert bar.get_metrics(trainer, None) == {"train/loss": 0.5}  # nothing validated yet: v_num hidden, no objective
    bar.on_validation_end(trainer, None)
    for _ in range(50):  # the bar refreshes at every step
        assert bar.get_metrics(trainer, None) == {"train/loss": 0.5, "val/acc": "0.8750"}
    assert _CountedReads.reads == 1
    trainer.sanity_checking = True  # the sanity check's validation is not the objective
    trainer.callback_metrics["val/acc"] = torch.tensor(0.1)
    bar.on_validation_end(trainer, None)
    assert bar.get_metrics(trainer, None)["val/acc"] == "0.8750"
