"""Is a batch of new production inputs still what the model was trained on? (``tunelab-monitor``)

Compares the new inputs with the training data's reference split on three signals: the
distribution of predicted classes (PSI), the shift of the representation the head reads
(distance between mean embeddings in units of the reference spread), and the drop in mean
confidence. Logs a PNG report to MLflow (experiment ``<name>-monitor``, tag ``tunelab.monitor_of``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunelab.config import build
from tunelab.data.modalities import modality_of
from tunelab.data.preprocess import Preprocessor
from tunelab.deploy.exported import read_inputs
from tunelab.engine.evaluation import to_device
from tunelab.engine.retention import forward_with_features
from tunelab.engine.trained import load_adapter, resolve, store_client
from tunelab.errors import TunelabError
from tunelab.tracking import tag_names
from tunelab.tracking.plots import figure, save
from tunelab.tracking.runs import mlflow_run, user_store

@dataclass
class Signals:
    probs: np.ndarray  # (N, C) softmax
    features: np.ndarray  # (N, D) the head's input


def psi(reference: np.ndarray, current: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index between two categorical distributions (counts or shares)."""
    p = reference / reference.sum() + eps
    q = current / current.sum() + eps
    return float(((q - p) * np.log(q / p)).sum())


def embedding_shift(reference: np.ndarray, current: np.ndarray) -> float:
    """How far the new batch's mean embedding moved, in units of the reference's own spread
    (mean distance of a reference sample to the reference mean). ~0 for the same data."""
    centre = reference.mean(0)
    spread = np.linalg.norm(reference - centre, axis=1).mean()
    return float(np.linalg.norm(current.mean(0) - centre) / max(spread, 1e-12))


def compare(reference: Signals, current: Signals) -> dict[str, float]:
    classes = reference.probs.shape[1]
    ref_counts = np.bincount(reference.probs.argmax(1), minlength=classes).astype(float)
    new_counts = np.bincount(current.probs.argmax(1), minlength=classes).astype(float)
    return {
        "monitor/prediction_psi": psi(ref_counts, new_counts),
        "monitor/embedding_shift": embedding_shift(reference.features, current.features),
        "monitor/confidence_drop": float(reference.probs.max(1).mean() - current.probs.max(1).mean()),
        "monitor/samples": float(len(current.probs)),
    }


THRESHOLDS = {"monitor/prediction_psi": 0.25, "monitor/embedding_shift": 0.5, "monitor/confidence_drop": 0.1}


@torch.no_grad()
def signals(adapter, batches) -> Signals:
    """Softmax and head inputs for every batch of model inputs."""
    head = next(g for g in adapter.groups if g.name == "head").param_names
    probs, feats = [], []
    for inputs in batches:
        found, logits = forward_with_features(adapter.model, head, to_device(inputs, "cpu"))
        feats.append(found.cpu())
        probs.append(torch.softmax(logits.float(), dim=1))
    return Signals(torch.cat(probs).numpy(), torch.cat(feats).numpy())


def report_plot(reference: Signals, current: Signals, metrics: dict, classes: list[str], path: Path) -> Path:
    fig, (left, right) = figure((10, 3.8), ncols=2)
    n = reference.probs.shape[1]
    ref = np.bincount(reference.probs.argmax(1), minlength=n) / len(reference.probs)
    new = np.bincount(current.probs.argmax(1), minlength=n) / len(current.probs)
    xs = np.arange(n)
    left.bar(xs - 0.2, ref, width=0.4, label="reference")
    left.bar(xs + 0.2, new, width=0.4, label="new")
    left.set_xticks(xs, [c[:10] for c in classes], rotation=60, fontsize=7)
    left.set_title(f"predicted classes (PSI {metrics['monitor/prediction_psi']:.3f})", fontsize=9)
    left.legend(fontsize=8)
    bins = np.linspace(0, 1, 21)
    right.hist(reference.probs.max(1), bins=bins, alpha=0.6, density=True, label="reference")
    right.hist(current.probs.max(1), bins=bins, alpha=0.6, density=True, label="new")
    right.set_title(f"confidence (drop {metrics['monitor/confidence_drop']:.3f}), "
                    f"embedding shift {metrics['monitor/embedding_shift']:.2f}", fontsize=9)
    right.legend(fontsize=8)
    return save(fig, path)


def monitor(source: str, inputs: Path, column: str | None = None, reference: str = "val",
            thresholds: dict[str, float] = THRESHOLDS, store: Path | None = None,
            log: bool = True) -> tuple[dict[str, float], list[str]]:
    """The signals of ``inputs`` against ``source``'s training data, and the thresholds they pass."""
    with tempfile.TemporaryDirectory(prefix="tunelab-monitor-") as tmp:
        client = store_client(store)
        trained = resolve(source, client, Path(tmp))
        if trained.meta["task"] != "classification":
            raise TunelabError("tunelab-monitor watches single-label classifiers (prediction shares and confidence), "
                               f"not {trained.meta['task']} models.")
        adapter = load_adapter(trained)
        dm = build(trained.cfg.data, "data").scan()
        dm.set_model_data_config(adapter.data_config)
        if reference not in dm.splits:
            raise TunelabError(f"--reference {reference!r}: the training data has splits {sorted(dm.splits)}.")
        reference_signals = signals(adapter, (x for x, _ in dm.loader(reference)))
        preprocess = Preprocessor(trained.meta["preprocess"], modality_of(trained.meta).processor(adapter.data_config))
        items = read_inputs(Path(inputs), trained.meta["preprocess"], column)
        current = signals(adapter, (preprocess(items[i: i + 64]) for i in range(0, len(items), 64)))
        metrics = compare(reference_signals, current)
        alarms = [f"{k.split('/')[1]} {metrics[k]:.3f} > {limit:g}" for k, limit in thresholds.items() if metrics[k] > limit]
        metrics["monitor/retrain"] = float(bool(alarms))
        if log:
            _log(trained, Path(inputs), metrics, reference_signals, current, Path(tmp), client.tracking_uri)
    return metrics, alarms


def _log(trained, inputs: Path, metrics, reference, current, tmp: Path, uri: str | None) -> None:
    """An MLflow run in ``<experiment>-monitor`` (tag ``tunelab.kind=monitor``), in the store the
    user chose (``uri``; never one a stored config names)."""
    with mlflow_run(user_store(trained.cfg), run_name=f"monitor {inputs.name}", kind="monitor", uri=uri) as run:
        run.set_tag(tag_names.MONITOR_INPUTS, str(inputs))
        if trained.run_id:
            run.set_tag(tag_names.MONITOR_OF, trained.run_id)
        run.log_metrics(metrics)
        run.log_artifact(report_plot(reference, current, metrics, trained.classes, tmp / "monitor_report.png"))
