"""What the module measures on every split: accuracy, macro precision / recall / F1 and AUROC
for classification; MSE, MAE and R² for regression (torchmetrics, so DDP ranks are reduced)."""

from __future__ import annotations

import logging

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score, MulticlassPrecision, MulticlassRecall,
)
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score
from torchmetrics.utilities import dim_zero_cat

from tunelab.engine.evaluation import auroc_note, macro_auroc

log = logging.getLogger("tunelab")


def classification_metrics(num_classes: int) -> MetricCollection:
    return MetricCollection({
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "precision": MulticlassPrecision(num_classes, average="macro"),
        "recall": MulticlassRecall(num_classes, average="macro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    })


class SoftmaxAUROC(MulticlassAUROC):
    """Macro one-vs-rest AUROC fed logits, with evaluation.macro_auroc's rule for classes
    without samples, so training and ``tunelab-eval`` give one number on the same data.

    Stores every prediction (N × C floats; fine for val/test) and, under DDP, gathers them
    from all ranks in ``compute()`` like any torchmetrics list state. ``compute()`` returns
    ``(value or None, missing classes)``, not a tensor: it is logged by hand, not by log_dict."""

    def __init__(self, num_classes: int):
        super().__init__(num_classes, average="macro", thresholds=None)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        # Softmax here: torchmetrics applies it only when some value lies outside [0, 1],
        # so small logits (a fresh head) would otherwise be ranked raw.
        super().update(logits.float().softmax(dim=1), target)

    def compute(self) -> tuple[torch.Tensor | None, list[int]]:
        return macro_auroc(dim_zero_cat(self.preds), dim_zero_cat(self.target), self.num_classes)


def regression_metrics() -> MetricCollection:
    return MetricCollection({"mse": MeanSquaredError(), "mae": MeanAbsoluteError(), "r2": R2Score()})


def task_metrics(task: str, num_outputs: int) -> MetricCollection:
    return classification_metrics(num_outputs) if task == "classification" else regression_metrics()


def epoch_auroc(metric: SoftmaxAUROC, split: str, noted: set[str], warn: bool) -> float | None:
    """``<split>/auroc`` over the epoch's predictions; None where it is undefined.

    A class without samples in the split (a small split, limit_val_batches) has no defined
    one-vs-rest AUROC: the value covers the classes present and one warning per split (``noted``
    holds the splits already warned of; ``warn``: this rank speaks) says which are missing,
    rather than dropping the metric for every run with a short split. With fewer than two
    classes present nothing is defined."""
    value, missing = metric.compute()  # gathered over DDP ranks: the same on every rank
    note = auroc_note(f"{split}/auroc", metric.num_classes, missing, logged=value is not None)
    if note and split not in noted:
        noted.add(split)
        if warn:
            log.warning(note)
    return value
