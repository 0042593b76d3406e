"""An export folder read back: its runtime session, labels and preprocessing, and the raw inputs
it labels (``tunelab-predict``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from tunelab.data.modalities import modality, modality_of
from tunelab.data.preprocess import Preprocessor
from tunelab.data.table import read_frame
from tunelab.errors import TunelabError


class Exported:
    """An export folder: its runtime session, labels and preprocessing."""

    def __init__(self, folder: Path, runtime: str = "auto"):
        self.folder = Path(folder)
        meta_path = self.folder / "tunelab_export.json"
        if not meta_path.is_file():
            raise TunelabError(f"{self.folder} is not a tunelab export (no tunelab_export.json); make one with tunelab-export.")
        self.meta = json.loads(meta_path.read_text())
        self.kind = modality_of(self.meta)
        self.preprocess = Preprocessor(self.meta["preprocess"], self.kind.load_processor(self.folder / "preprocess"))
        onnx, ts = self.folder / "model.onnx", self.folder / "model.ts"
        if runtime == "auto":
            runtime = "onnx" if onnx.is_file() else "torchscript"
        if runtime == "onnx":
            import onnxruntime as ort

            self.session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        else:
            import warnings

            import torch

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
                self.module = torch.jit.load(str(ts)).eval()
        self.runtime = runtime

    def scores(self, items: list) -> np.ndarray:
        inputs = self.preprocess(items)
        tensors = [inputs] if not isinstance(inputs, dict) else [inputs[name] for name in self.meta["inputs"]]
        if self.runtime == "onnx":
            feed = {name: t.numpy() for name, t in zip(self.meta["inputs"], tensors)}
            return self.session.run(None, feed)[0]
        import torch

        with torch.no_grad():
            return self.module(*tensors).numpy()

    def label(self, items: list) -> pd.DataFrame:
        out = self.scores(items)
        if self.meta["task"] == "regression":
            return pd.DataFrame({"prediction": out.reshape(-1)})
        if self.meta["task"] == "multilabel":
            return label_sets(1 / (1 + np.exp(-out.astype(np.float64))), self.meta["classes"], self.meta["threshold"])
        logits = out - out.max(axis=1, keepdims=True)
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        classes = self.meta["classes"]
        return pd.DataFrame({"label": [classes[i] for i in probs.argmax(axis=1)], "confidence": probs.max(axis=1)})


def label_sets(probs: np.ndarray, classes: list[str], threshold: float) -> pd.DataFrame:
    """Multi-label predictions: ``labels`` (the names whose probability exceeds ``threshold``,
    joined by ``|``; empty when none does) and ``prob_<label>``, each label's sigmoid probability."""
    chosen = ["|".join(c for c, p in zip(classes, row) if p > threshold) for row in probs]
    frame = pd.DataFrame(probs, columns=[f"prob_{c}" for c in classes])
    frame.insert(0, "labels", chosen)
    return frame


def read_inputs(source: Path, settings: dict, column: str | None, pair_column: str = "text_pair") -> list:
    """The raw inputs of a folder or a CSV column (with ``pair_column``: (text, pair) rows, for a
    model trained on text pairs)."""
    kind = modality(settings["modality"])
    if source.is_dir():
        return kind.files_under(source)

    if not source.is_file():
        raise TunelabError(f"{source} does not exist: pass a folder of files or a CSV.")
    column = column or kind.csv_column
    columns = [column, pair_column] if settings.get("pairs") else [column]
    frame, _ = read_frame(str(source), {}, key="inputs")
    for name in columns:
        if name not in frame.columns:
            flag = "--column" if name == column else "--pair-column (the model was trained on text pairs)"
            raise TunelabError(f"{source} has no column {name!r} (columns: {list(frame.columns)}); pass {flag} NAME.")
    frame = frame.dropna(subset=columns)
    if settings.get("pairs"):
        return list(zip(frame[column].astype(str), frame[pair_column].astype(str)))
    values = frame[column].tolist()
    if kind.suffixes:  # paths relative to the CSV's folder, as the data configs read them
        values = [str(v) if Path(str(v)).is_absolute() else str(source.parent / str(v)) for v in values]
    return values


def label_inputs(model: Exported, items: list, batch_size: int = 32, progress: bool = False) -> pd.DataFrame:
    """``items`` labelled in batches: ``input`` then ``label,confidence`` (``labels,prob_<label>...`` for
    multi-label, ``prediction`` for regression)."""
    from tqdm import tqdm

    starts = tqdm(range(0, len(items), batch_size), desc="labelling", unit="batch", disable=not progress)
    result = pd.concat([model.label(items[i: i + batch_size]) for i in starts], ignore_index=True)
    result.insert(0, "input", items)
    return result
