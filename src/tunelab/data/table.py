"""The labelled table every data source returns, and label encoding shared by all sources.

A source (images, texts, audio clips) yields a ``Table``: one item per example, its label,
the class names, and optionally a held-out test table it ships. The DataModule splits it;
the modality only decides how an item becomes a tensor.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tunelab.errors import TunelabError

TASKS = ("classification", "regression")
log = logging.getLogger(__name__)


class ItemError(TunelabError):
    """One example (an image, a clip) that cannot be read, found while loading it.

    Inside a DataLoader worker, torch re-raises an item's exception in the main process as
    ``type(err)("Caught ... in DataLoader worker process 0.\nOriginal Traceback ...")``: a
    traceback inside the message, which the entry points would print. This type cuts such a
    message back to the original one line (the traceback's last line), so the user reads
    ``cannot read image x.png: ...`` whether or not workers loaded it.
    """

    def __init__(self, message: str = ""):
        message = str(message)
        if message.startswith("Caught ") and "Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


def line_of(kind: str, index: int) -> str:
    """Where a table row is in its file, as an editor shows it (CSV/TSV: after the header line)."""
    return {"csv": f"line {index + 2}", "tsv": f"line {index + 2}", "jsonl": f"line {index + 1}"}.get(
        kind, f"row {index + 1}")


def first_few(items: Sequence[str], limit: int = 3) -> str:
    """``a, b, c and 4 more``: enough to find the problem, still one line."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


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
    empty = frame[used].isna().any(axis=1)
    frame = frame[~empty]
    if frame.empty:
        raise TunelabError(f"{file} has no rows with values in all of {used}.")
    if empty.any():  # a documented skip, counted: rows with a missing cell (a short row, an empty label...)
        lines = [line_of(kind, int(i)) for i in np.flatnonzero(empty.to_numpy())]
        log.warning("%s: skipped %d of %d rows with an empty %s (%s)", file, len(lines), len(empty),
                    " or ".join(map(repr, used)), first_few(lines))
    return frame.reset_index(drop=True), file


def load_path_table(path: str, path_column: str = "path", label_column: str = "label", root: str | None = None,
                    task: str = "classification") -> Table:
    """A CSV / TSV / JSONL / Parquet table of file paths (images, audio) and labels; relative
    paths resolve against ``root`` (default: the table's folder)."""
    from pathlib import Path

    frame, file = read_frame(path, {"path_column": path_column, "label_column": label_column})
    base = Path(root).expanduser() if root else file.parent
    paths = [str(p if Path(p).is_absolute() else base / p) for p in frame[path_column].astype(str)]
    missing = [p for p in paths if not Path(p).is_file()]  # one stat per row: cheap, and before any training
    if missing:
        raise TunelabError(
            f"data.source.path: {len(missing)} of {len(paths)} files listed in {file} (column {path_column!r}) do not "
            f"exist: {first_few(missing)}. Fix those rows, or data.source.root if relative paths resolve against "
            f"the wrong folder (now {base})."
        )
    if root:
        check_inside_root(paths, base, f"listed in {file} (column {path_column!r})")
    labels, classes = encode_labels(frame[label_column], task, f"{file} column {label_column!r}")
    return Table(paths, labels, classes, str(file))


def is_inside(real_path: str, real_base: str) -> bool:
    """Both already resolved (``os.path.realpath``): links and ``..`` cannot fool the comparison."""
    return os.path.commonpath([real_path, real_base]) == real_base


def check_inside_root(paths: Sequence[str], base, listed: str) -> None:
    """With data.source.root set, every file must really be under it (``..``, absolute paths and
    links included): the root is the user's word for where the data is, whoever wrote the table."""
    real_base = os.path.realpath(base)
    outside = []
    for path in paths:
        real = os.path.realpath(path)
        if not is_inside(real, real_base):
            outside.append(real if os.path.abspath(path) == real else f"{path} -> {real}")
    if outside:
        raise TunelabError(
            f"data.source.root={base}: {len(outside)} of {len(paths)} files {listed} are outside it: "
            f"{first_few(outside, 2)}. Move them under the root, or set data.source.root=null to read the paths "
            "as listed (relative ones from the table's folder)."
        )
