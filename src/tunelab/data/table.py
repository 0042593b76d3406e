"""The labelled table every data source returns, and label encoding shared by all sources.

A source (images, texts, audio clips) yields a ``Table``: one item per example, its label,
the class names, and optionally a held-out test table it ships. The DataModule splits it;
the modality only decides how an item becomes a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tunelab.errors import TunelabError

TASKS = ("classification", "regression")


@dataclass
class Table:
    items: Sequence  # image arrays or paths, texts, audio file paths
    labels: np.ndarray  # int64 class indices (classification) or float32 targets (regression)
    classes: list[str]  # class names by index; empty for regression
    origin: str  # where the data came from, for messages
    test: "Table | None" = None  # a held-out split the source ships (e.g. Fashion-MNIST t10k)
    pairs: Sequence[str] | None = None  # text pairs: the second segment of each item

    def __len__(self) -> int:
        return len(self.labels)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise TunelabError(f"data.task must be one of {', '.join(TASKS)}, got {task!r}.")
    return task


def encode_labels(values, task: str, where: str, classes: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Raw label values -> (labels, class names).

    Classification: integer labels are class indices; anything else is a class name, indexed
    in sorted order. Given ``classes`` (the training split's), a value outside them is an
    error: a model cannot be scored on a class it never had a logit for.
    Regression: numbers, as float32.
    """
    import pandas as pd

    series = pd.Series(values)
    if check_task(task) == "regression":
        numbers = pd.to_numeric(series, errors="coerce")
        if numbers.isna().any():
            bad = series[numbers.isna()].iloc[0]
            raise TunelabError(f"{where}: regression needs numeric targets, found {bad!r}. "
                               "Pick a numeric label column, or set data.task=classification.")
        return numbers.to_numpy(dtype=np.float32), []
    if pd.api.types.is_integer_dtype(series):
        labels = series.to_numpy(dtype=np.int64)
        if len(labels) and labels.min() < 0:
            raise TunelabError(f"{where}: negative labels; use class indices 0..K-1 or class names.")
        names = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
        if classes is not None and len(labels) and labels.max() >= len(classes):
            raise TunelabError(f"{where}: label {int(labels.max())} never occurs in training "
                               f"({len(classes)} classes: 0..{len(classes) - 1}).")
        return labels, list(classes) if classes is not None else names
    text = series.astype(str)
    if classes is None:
        classes = sorted(text.unique())
    index = {c: i for i, c in enumerate(classes)}
    unseen = sorted(set(text) - set(index))
    if unseen:
        raise TunelabError(
            f"{where}: label(s) {unseen[:5]} never occur in training (training classes: {classes[:12]}). "
            "Drop those rows, or make sure every class is present in the training data."
        )
    return np.array([index[c] for c in text], dtype=np.int64), list(classes)


READERS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def read_frame(path: str, columns: dict[str, str | None], key: str = "data.source.path"):
    """Read a CSV / TSV / JSONL / Parquet file and check that it has ``columns``.

    ``columns`` maps the config key that names a column (``label_column``) to the column
    name, so a missing column is reported with the exact override that fixes it. Rows with
    a missing value in any of these columns are dropped. Returns (frame, resolved path).
    """
    from pathlib import Path

    import pandas as pd

    file = Path(path).expanduser()
    if not file.is_file():
        raise TunelabError(f"{key}: no file at {file}.")
    kind = READERS.get(file.suffix.lower())
    if kind is None:
        raise TunelabError(f"{key}: {file.name} is not {', '.join(READERS)}; convert it or rename it.")
    try:
        if kind == "parquet":
            frame = pd.read_parquet(file)
        elif kind == "jsonl":
            frame = pd.read_json(file, lines=True)
        else:
            frame = pd.read_csv(file, sep="\t" if kind == "tsv" else ",")
    except (ValueError, OSError, pd.errors.ParserError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TunelabError(f"{key}: cannot parse {file} as {kind}: {first}") from None
    for name, column in columns.items():
        if column is not None and column not in frame.columns:
            raise TunelabError(
                f"{file} has no column {column!r} (columns: {', '.join(map(str, frame.columns))}). "
                f"Set data.source.{name}=<column name>."
            )
    used = [c for c in columns.values() if c is not None]
    frame = frame.dropna(subset=used)
    if frame.empty:
        raise TunelabError(f"{file} has no rows with values in all of {used}.")
    return frame.reset_index(drop=True), file


def load_path_table(path: str, path_column: str = "path", label_column: str = "label", root: str | None = None,
                    task: str = "classification") -> Table:
    """A CSV / TSV / JSONL / Parquet table of file paths (images, audio) and labels; relative
    paths resolve against ``root`` (default: the table's folder)."""
    from pathlib import Path

    frame, file = read_frame(path, {"path_column": path_column, "label_column": label_column})
    base = Path(root).expanduser() if root else file.parent
    paths = [str(p if Path(p).is_absolute() else base / p) for p in frame[path_column].astype(str)]
    labels, classes = encode_labels(frame[label_column], task, f"{file} column {label_column!r}")
    return Table(paths, labels, classes, str(file))
