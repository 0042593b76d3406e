"""The labelled table every data source returns, and label encoding shared by all sources.

A source (images, texts, audio clips) yields a ``Table``: one item per example, its label,
the class names, and optionally a held-out test table it ships. The DataModule splits it;
the modality only decides how an item becomes a tensor.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Annotated, Any, Sequence

import numpy as np

from tunelab.config.settings import BOOL, either, string_list, text
from tunelab.errors import TunelabError

TASKS = ("classification", "multilabel", "regression")
# data.source.label_column: one column, or (multilabel) one 0/1 column per label
LABEL_COLUMN = either(text(), string_list("e.g. [cat, dog]"))
SEPARATOR = text()  # joins label names in one multi-label cell: cat|dog
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


def row_lines(frame, rows) -> list[str]:
    """Where rows of a frame read by ``read_frame`` are in their file (rows it skipped counted)."""
    kind, kept = frame.attrs.get("kind", ""), frame.attrs.get("rows")
    return [line_of(kind, int(kept[i]) if kept is not None else int(i)) for i in rows]


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
    labels: np.ndarray  # int64 class indices, (N, L) int64 0/1 (multilabel) or float32 targets (regression)
    classes: list[str]  # class (label) names by index; empty for regression
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
    Regression: numbers, as float32. Multi-label labels come from ``table_labels``.
    """
    import pandas as pd

    series = pd.Series(values)
    if check_task(task) == "multilabel":
        raise TunelabError(f"{where}: this source gives one label per example; data.task=multilabel needs a table "
                           "with several labels per row (data=image_csv or data=text_table).")
    if task == "regression":
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


def label_columns(label_column) -> str | list[str]:
    """A column name, or (multi-label) a list of 0/1 columns as plain strings (a config gives a ListConfig)."""
    return label_column if isinstance(label_column, str) else [str(c) for c in label_column]


def encode_multilabel(frame, label_column: str | list[str], where: str, classes: list[str] | None = None,
                      separator: str = "|", allow_empty: bool = False) -> tuple[np.ndarray, list[str]]:
    """The (N, L) 0/1 labels of ``frame`` and the label names. Given ``classes`` (the training
    file's), a test file must name no other label (0/1 columns: read_frame checked they exist)."""
    if isinstance(label_column, list):
        labels, names = _from_columns(frame, label_column, where), list(label_column)
    else:
        labels, names = _from_names(frame, label_column, where, classes, separator)
    if not allow_empty and len(labels) and not labels.any(axis=1).all():
        lines = row_lines(frame, np.flatnonzero(~labels.any(axis=1)))
        raise TunelabError(f"{where}: {len(lines)} of {len(labels)} rows have no label ({first_few(lines)}); give "
                           "each row at least one label, or set data.source.allow_empty=true if a row may have none.")
    return labels, names


def _from_names(frame, column: str, where: str, classes: list[str] | None, separator: str):
    import pandas as pd

    rows = [[] if pd.isna(cell) else sorted({p.strip() for p in str(cell).split(separator) if p.strip()})
            for cell in frame[column]]
    if classes is None:
        classes = sorted({name for row in rows for name in row})
    index = {c: i for i, c in enumerate(classes)}
    unseen = sorted({name for row in rows for name in row} - set(index))
    if unseen:
        raise TunelabError(f"{where} (column {column!r}): label(s) {unseen[:5]} never occur in training (training "
                           f"labels: {classes[:12]}). Drop them, or make sure every label occurs in the training data.")
    labels = np.zeros((len(rows), len(classes)), dtype=np.int64)
    for i, row in enumerate(rows):
        labels[i, [index[name] for name in row]] = 1
    return labels, list(classes)


def _from_columns(frame, columns: list[str], where: str) -> np.ndarray:
    import pandas as pd

    if len(set(columns)) != len(columns):
        raise TunelabError(f"data.source.label_column lists a column twice: {columns}.")
    values = frame[columns].apply(lambda s: pd.to_numeric(s.astype(object).replace({True: 1, False: 0}),
                                                          errors="coerce"))
    bad = ~values.isin([0, 1]).to_numpy()
    if bad.any():
        row, col = (int(i[0]) for i in np.nonzero(bad))
        raise TunelabError(f"{where} column {columns[col]!r}, {row_lines(frame, [row])[0]}: "
                           f"{frame[columns[col]].tolist()[row]!r} is not 0 or 1; each column of "
                           "data.source.label_column holds one label as 0/1.")
    return values.to_numpy(dtype=np.int64)


def table_labels(frame, label_column: str | list[str], task: str, where: str, classes: list[str] | None = None,
                 separator: str = "|", allow_empty: bool = False) -> tuple[np.ndarray, list[str]]:
    """The labels of a frame ``read_frame`` read (``where``: its file): one per row
    (``encode_labels``), or several (``data.task=multilabel``, ``encode_multilabel``)."""
    if check_task(task) == "multilabel":
        return encode_multilabel(frame, label_column, where, classes, separator, allow_empty)
    if not isinstance(label_column, str):
        raise TunelabError(f"data.source.label_column={label_column} lists one 0/1 column per label, which is for "
                           f"data.task=multilabel, not {task}; name one column.")
    return encode_labels(frame[label_column], task, f"{where} column {label_column!r}", classes)


def empty_allowed(label_column: str | list[str], task: str) -> tuple[str, ...]:
    """``read_frame``'s ``may_be_empty``: an empty cell of label names is a row with no label."""
    return ("label_column",) if task == "multilabel" and isinstance(label_column, str) else ()


READERS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def read_frame(path: str, columns: dict[str, str | list[str] | None], key: str = "data.source.path",
               may_be_empty: tuple[str, ...] = ()):
    """Read a CSV / TSV / JSONL / Parquet file and check that it has ``columns``.

    ``columns`` maps the config key that names a column (``label_column``) to the column
    name (or names: one 0/1 column per label), so a missing column is reported with the exact
    override that fixes it. Rows with a missing value in any of these columns are dropped, except
    in the keys ``may_be_empty`` (a multi-label row without labels). Returns (frame, resolved
    path); ``frame.attrs`` holds the file kind and the kept rows' positions (``row_lines``).
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
    for name, named in columns.items():
        for column in named if isinstance(named, list) else [named]:
            if column is not None and column not in frame.columns:
                fix = "[<column names>]" if isinstance(named, list) else "<column name>"
                raise TunelabError(f"{file} has no column {column!r} (columns: {', '.join(map(str, frame.columns))}). "
                                   f"Set data.source.{name}={fix}.")
    used = [c for k, v in columns.items() if k not in may_be_empty for c in (v if isinstance(v, list) else [v])
            if c is not None]
    empty = frame[used].isna().any(axis=1)
    frame = frame[~empty]
    if frame.empty:
        raise TunelabError(f"{file} has no rows with values in all of {used}.")
    if empty.any():  # a documented skip, counted: rows with a missing cell (a short row, an empty label...)
        lines = [line_of(kind, int(i)) for i in np.flatnonzero(empty.to_numpy())]
        log.warning("%s: skipped %d of %d rows with an empty %s (%s)", file, len(lines), len(empty),
                    " or ".join(map(repr, used)), first_few(lines))
    frame = frame.reset_index(drop=True)
    frame.attrs.update(kind=kind, rows=np.flatnonzero(~empty.to_numpy()))
    return frame, file


def load_path_table(path: str, path_column: str = "path", label_column: Annotated[Any, LABEL_COLUMN] = "label",
                    root: str | None = None, task: str = "classification",
                    label_separator: Annotated[str, SEPARATOR] = "|", allow_empty: Annotated[bool, BOOL] = False) -> Table:
    """A CSV / TSV / JSONL / Parquet table of file paths (images, audio) and labels; relative
    paths resolve against ``root`` (default: the table's folder). Multi-label: see ``encode_multilabel``."""
    from pathlib import Path

    label_column = label_columns(label_column)
    frame, file = read_frame(path, {"path_column": path_column, "label_column": label_column},
                             may_be_empty=empty_allowed(label_column, task))
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
    labels, classes = table_labels(frame, label_column, task, str(file), None, label_separator, allow_empty)
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
