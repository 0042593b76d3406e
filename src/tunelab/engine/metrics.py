"""What the module measures on every split: accuracy, macro precision / recall / F1 and AUROC
for classification; mAP, macro and micro F1, macro precision / recall and exact match at
``data.threshold`` for multi-label data; MSE, MAE and R² for regression (torchmetrics, so DDP
ranks are reduced)."""

from __future__ import annotations

import logging

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score, MulticlassPrecision, MulticlassRecall,
    MultilabelAveragePrecision, MultilabelExactMatch, MultilabelF1Score, MultilabelPrecision, MultilabelRecall,
)
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score
from torchmetrics.utilities import dim_zero_cat

from tunelab.engine.evaluation import auroc_note, macro_auroc, present_labels_map

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


class PresentLabelsAP(MultilabelAveragePrecision):
    """Macro average precision over the labels with positives in the split (evaluation's
    ``present_labels_map``: the same number at training and in ``tunelab-eval``). Stores every
    prediction (N × L floats), gathered over DDP ranks like any torchmetrics list state."""

    def __init__(self, num_labels: int):
        super().__init__(num_labels, average="macro", thresholds=None)

    def compute(self) -> torch.Tensor:
        return present_labels_map(dim_zero_cat(self.preds), dim_zero_cat(self.target))


class SigmoidMetrics(MetricCollection):
    """Multi-label metrics fed logits and 0/1 targets: each label's sigmoid probability goes in
    (torchmetrics applies a sigmoid only when some value lies outside [0, 1], so a fresh head's
    small logits would be read as probabilities), and integer targets (the loss takes floats)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor):
        return super().forward(logits.float().sigmoid(), target.long())

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        super().update(logits.float().sigmoid(), target.long())


def multilabel_metrics(num_labels: int, threshold: float = 0.5) -> MetricCollection:
    """mAP ranks (no threshold); F1, precision, recall and exact match (every label of an example
    right) count a label as predicted when its probability exceeds ``threshold``."""
    at = {"num_labels": num_labels, "threshold": threshold}
    return SigmoidMetrics({
        "map": PresentLabelsAP(num_labels),
        "f1": MultilabelF1Score(**at, average="macro"),
        "f1_micro": MultilabelF1Score(**at, average="micro"),
        "precision": MultilabelPrecision(**at, average="macro"),
        "recall": MultilabelRecall(**at, average="macro"),
        "exact_match": MultilabelExactMatch(**at),
    })


def task_metrics(task: str, num_outputs: int, threshold: float = 0.5) -> MetricCollection:
    if task == "multilabel":
        return multilabel_metrics(num_outputs, threshold)
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
