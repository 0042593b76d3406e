"""Evaluate a model on a split: the full report (per class, AUROC, calibration) and its plots.

Shared by ``tunelab-eval`` and by training's end-of-run evaluation of shifted (OOD) splits,
so a number means the same thing wherever it was computed.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
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
    multilabel_average_precision,
    multilabel_exact_match,
    multilabel_f1_score,
    multilabel_precision,
    multilabel_recall,
)
from torchmetrics.functional.regression import mean_absolute_error, mean_squared_error, r2_score

from tunelab.tracking.plots import figure, save

log = logging.getLogger("tunelab")


@dataclass
class Outputs:
    """Everything a model said about one split: logits (or predictions) and the targets."""
    scores: torch.Tensor  # (N, C) logits (one per class or label), or (N,) regression predictions in the data's units
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


def macro_auroc(probs: torch.Tensor, targets: torch.Tensor, num_classes: int) -> tuple[torch.Tensor | None, list[int]]:
    """Macro one-vs-rest AUROC of softmax ``probs`` over the classes that have samples, and the
    classes left out (value None when fewer than two classes have samples).

    The one rule behind ``val/auroc`` and ``test/auroc`` at training, ``tunelab-eval`` and the
    OOD report. A class without samples has no positives, so its one-vs-rest AUROC is undefined;
    torchmetrics scores it 0, sklearn NaN or an error. Averaging over the classes present instead keeps
    the metric for the small or truncated splits where it is missing (a 1000-class val split
    rarely holds every class), and stays the same set, so comparable, across a run's epochs."""
    present = torch.bincount(targets.long(), minlength=num_classes) > 0
    missing = (~present).nonzero().flatten().tolist()
    if int(present.sum()) < 2:  # no class has both positives and negatives
        return None, missing
    # Class c's one-vs-rest AUROC reads only column c and (target == c): keeping the present
    # columns and renumbering their targets is exact, and spares torchmetrics' warning per empty class.
    index = present.long().cumsum(0) - 1
    value = multiclass_auroc(probs[:, present].float(), index[targets.long()], int(present.sum()), average="macro")
    return value, missing


def auroc_note(name: str, num_classes: int, missing: list[int], logged: bool) -> str | None:
    """The one line saying what ``name`` covers when classes have no samples (None when all do)."""
    if not missing:
        return None
    kept = num_classes - len(missing)
    if not logged:
        return (f"{name} not logged: {kept} of {num_classes} classes {'has' if kept == 1 else 'have'} samples in "
                "this split; one-vs-rest AUROC needs at least two")
    listed = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
    which = f"class {listed} has" if len(missing) == 1 else f"classes {listed} have"
    return f"{name} over {kept} of {num_classes} classes: {which} no samples in this split"


def classification_report(out: Outputs, prefix: str = "") -> dict[str, float]:
    """``prefix`` (e.g. ``test/``) only names the metric in the AUROC note."""
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
    auroc, missing = macro_auroc(probs, y, n)
    note = auroc_note(f"{prefix}auroc", n, missing, logged=auroc is not None)
    if note:
        log.warning(note)
    if auroc is not None:
        report["auroc"] = auroc
    per_class = multiclass_f1_score(logits, y, n, average=None)
    for key, value in zip(class_metric_keys(out.classes or [str(i) for i in range(n)]), per_class):
        report[f"f1_class/{key}"] = value
    return {k: float(v) for k, v in report.items()}


def present_labels_map(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Macro average precision over the labels with positives in the split: a label without
    any has no defined AP (torchmetrics scores it 0), so it is left out, as ``macro_auroc`` leaves
    out classes without samples. NaN when no label has a positive. ``val/map``, ``test/map``
    and ``tunelab-eval``'s ``map`` all come from here."""
    present = targets.long().sum(0) > 0
    if not present.any():
        return torch.tensor(float("nan"))
    return multilabel_average_precision(probs[:, present].float(), targets[:, present].long(), int(present.sum()),
                                        average="macro", thresholds=None)


def multilabel_report(out: Outputs, threshold: float = 0.5) -> dict[str, float]:
    """What the module logs for multi-label data (engine/metrics.py), and F1 per label."""
    probs, y = out.scores.float().sigmoid(), out.targets.long()
    at = {"num_labels": probs.shape[1], "threshold": threshold}
    report = {
        "map": present_labels_map(probs, y),
        "f1": multilabel_f1_score(probs, y, **at, average="macro"),
        "f1_micro": multilabel_f1_score(probs, y, **at, average="micro"),
        "precision": multilabel_precision(probs, y, **at, average="macro"),
        "recall": multilabel_recall(probs, y, **at, average="macro"),
        "exact_match": multilabel_exact_match(probs, y, **at),
    }
    per_label = multilabel_f1_score(probs, y, **at, average=None)
    for key, value in zip(class_metric_keys(out.classes or [str(i) for i in range(at["num_labels"])]), per_label):
        report[f"f1_class/{key}"] = value
    return {k: float(v) for k, v in report.items()}


def regression_report(out: Outputs) -> dict[str, float]:
    pred, y = out.scores.float().flatten(), out.targets.float().flatten()
    report = {"mse": mean_squared_error(pred, y), "mae": mean_absolute_error(pred, y)}
    if len(y) > 1:
        report["r2"] = r2_score(pred, y)
    return {k: float(v) for k, v in report.items()}


def report(out: Outputs, task: str, prefix: str = "", threshold: float = 0.5) -> dict[str, float]:
    """``threshold``: where a multi-label probability counts as the label (``data.threshold``)."""
    if task == "multilabel":
        return multilabel_report(out, threshold)
    return classification_report(out, prefix) if task == "classification" else regression_report(out)


KEY_CHARS = 60  # of a class name kept in its metric key: long enough to read, short enough for the UI


def class_metric_keys(classes: list[str]) -> list[str]:
    """One distinct MLflow metric key per class, in class order. A name MLflow takes as it is
    stays as it is; one that had to change (characters MLflow refuses, ``/`` which would nest
    the key, cut at ``KEY_CHARS``) or that collides with another gets ``_<class index>``: "a,b"
    and "a;b" become ``a_b_0`` and ``a_b_1``, never one key that loses a class. The suffixed keys
    cannot collide (the last ``_<digits>`` is the index), and a plain key that equals one of
    them is suffixed in turn. ``class_key_table`` says which key is which class."""
    plain = ["".join(c if c.isalnum() or c in "_-. " else "_" for c in str(name))[:KEY_CHARS] for name in classes]
    suffixed = {i for i, (name, key) in enumerate(zip(classes, plain)) if key != str(name) or key in ("", ".", "..")}
    while True:
        keys = [f"{key}_{i}" if i in suffixed else key for i, key in enumerate(plain)]
        uses = Counter(keys)
        clashing = {i for i, key in enumerate(keys) if i not in suffixed and uses[key] > 1}
        if not clashing:
            return keys
        suffixed |= clashing


def class_key_table(classes: list[str], prefix: str = "") -> str:
    """Class index -> class name -> per-class metric key (``prefix``: the split, ``test/``), as the
    JSON logged next to the metrics (``class_metric_keys.json``)."""
    rows = [{"index": i, "class": str(name), "metric_key": f"{prefix}f1_class/{key}"}
            for i, (name, key) in enumerate(zip(classes, class_metric_keys(classes)))]
    return json.dumps(rows, indent=1, ensure_ascii=False)


def reliability_plot(out: Outputs, path: Path, bins: int = 15) -> Path:
    """Confidence vs accuracy per bin: a calibrated model sits on the diagonal."""
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
        out.classes = dm.classes if dm.task != "regression" else []
        found = {k: v for k, v in report(out, dm.task, f"ood/{name}/", dm.threshold).items() if "f1_class/" not in k}
        results.update({f"ood/{name}/{k}": v for k, v in found.items()})
        if dm.task == "classification" and "test/acc" in reference:  # accuracy lost under the shift
            results[f"ood/{name}/acc_drop"] = reference["test/acc"] - found["acc"]
        elif "test/mse" in reference:  # error gained under the shift
            results[f"ood/{name}/mse_rise"] = found["mse"] - reference["test/mse"]
    return results
