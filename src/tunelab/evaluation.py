"""Evaluate a model on a split: the full report (per class, AUROC, calibration) and its plots.

Shared by ``tunelab-eval`` and by training's end-of-run evaluation of shifted (OOD) splits,
so a number means the same thing wherever it was computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)
from torchmetrics.functional.regression import mean_absolute_error, mean_squared_error, r2_score


@dataclass
class Outputs:
    """Everything a model said about one split: logits (or predictions) and the targets."""

    scores: torch.Tensor  # (N, C) logits, or (N,) regression predictions in the data's units
    targets: torch.Tensor
    classes: list[str] = field(default_factory=list)


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    return batch.to(device)


@torch.no_grad()
def predict(module, loader, device: str | torch.device = "cpu", max_batches: int | None = None) -> Outputs:
    """Run a FineTuneModule over a loader in eval mode (no Trainer needed)."""
    module.eval().to(device)
    scores, targets = [], []
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        scores.append(module(to_device(x, device)).float().cpu())
        targets.append(y.cpu())
    return Outputs(torch.cat(scores), torch.cat(targets))


def classification_report(out: Outputs) -> dict[str, float]:
    logits, y = out.scores, out.targets.long()
    n = logits.shape[1]
    probs = torch.softmax(logits, dim=1)
    report = {
        "acc": multiclass_accuracy(logits, y, n, average="micro"),
        "precision": multiclass_precision(logits, y, n, average="macro"),
        "recall": multiclass_recall(logits, y, n, average="macro"),
        "f1": multiclass_f1_score(logits, y, n, average="macro"),
        "ece": multiclass_calibration_error(probs, y, n, n_bins=15, norm="l1"),
    }
    if len(torch.unique(y)) == n:  # AUROC needs every class present
        report["auroc"] = multiclass_auroc(probs, y, n, average="macro")
    per_class = multiclass_f1_score(logits, y, n, average=None)
    for name, value in zip(out.classes or [str(i) for i in range(n)], per_class):
        report[f"f1_class/{_safe(name)}"] = value
    return {k: float(v) for k, v in report.items()}


def regression_report(out: Outputs) -> dict[str, float]:
    pred, y = out.scores.float().flatten(), out.targets.float().flatten()
    report = {"mse": mean_squared_error(pred, y), "mae": mean_absolute_error(pred, y)}
    if len(y) > 1:
        report["r2"] = r2_score(pred, y)
    return {k: float(v) for k, v in report.items()}


def report(out: Outputs, task: str) -> dict[str, float]:
    return classification_report(out) if task == "classification" else regression_report(out)


def _safe(name: str) -> str:
    """MLflow metric keys allow letters, digits, _ - . / and spaces."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in str(name))[:60]


def reliability_plot(out: Outputs, path: Path, bins: int = 15) -> Path:
    """Confidence vs accuracy per bin: a calibrated model sits on the diagonal."""
    from tunelab.plots import figure, save

    probs = torch.softmax(out.scores, dim=1)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == out.targets.long()).float()
    edges = np.linspace(0, 1, bins + 1)
    centers, accuracy, counts = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            centers.append(float(confidence[inside].mean()))
            accuracy.append(float(correct[inside].mean()))
            counts.append(int(inside.sum()))
    fig, ax = figure((4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfectly calibrated")
    ax.plot(centers, accuracy, "o-", label="model")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ece = multiclass_calibration_error(probs, out.targets.long(), probs.shape[1], n_bins=bins)
    ax.set_title(f"reliability (ECE {float(ece):.3f}, {len(out.targets)} samples)", fontsize=9)
    ax.legend(fontsize=8)
    return save(fig, path)


def residual_plot(out: Outputs, path: Path) -> Path:
    from tunelab.plots import figure, save

    pred, y = out.scores.float().flatten().numpy(), out.targets.float().flatten().numpy()
    fig, ax = figure((5, 4))
    ax.scatter(pred, y - pred, s=6, alpha=0.5)
    ax.axhline(0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("prediction")
    ax.set_ylabel("target - prediction")
    ax.set_title("residuals", fontsize=9)
    return save(fig, path)


def confusion(out: Outputs) -> torch.Tensor:
    return multiclass_confusion_matrix(out.scores, out.targets.long(), out.scores.shape[1])


def shifted_splits(module, dm, reference: dict[str, float], max_batches: int | None = None) -> dict[str, float]:
    """Evaluate every OOD split the data declares: ``ood/<name>/<metric>`` and the drop from test."""
    device = next(module.parameters()).device
    results: dict[str, float] = {}
    for name in dm.ood_names():
        out = predict(module, dm.ood_loader(name), device, max_batches)
        out.classes = dm.classes if dm.task == "classification" else []
        found = {k: v for k, v in report(out, dm.task).items() if "f1_class/" not in k}
        results.update({f"ood/{name}/{k}": v for k, v in found.items()})
        if dm.task == "classification" and "test/acc" in reference:  # accuracy lost under the shift
            results[f"ood/{name}/acc_drop"] = reference["test/acc"] - found["acc"]
        elif "test/mse" in reference:  # error gained under the shift
            results[f"ood/{name}/mse_rise"] = found["mse"] - reference["test/mse"]
    return results
