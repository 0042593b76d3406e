"""Multi-label data (``data.task=multilabel``): several labels per example, held as an (N, L)
0/1 array whose columns are the label names (``Table.classes``).

A table gives them in one of two layouts, read by ``table.encode_multilabel``:

- one column of label names joined by a separator (``label_column: tags``, ``cat|dog``;
  ``label_separator`` sets the separator), labels named in sorted order;
- one 0/1 column per label (``label_column: [cat, dog]``), labels named and ordered as listed.

A row without any label is refused unless ``allow_empty`` says that is data (no attribute holds).
This module checks such labels, stratifies their splits (``multilabel_strata``: each row by its
rarest positive label) and derives attribute labels from class labels (MNIST-5k digit attributes).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from tunelab.data.table import Table, first_few
from tunelab.errors import TunelabError

LAYOUTS = ("data.source.label_column=<column of names joined by data.source.label_separator>, or "
           "data.source.label_column=[<one 0/1 column per label>]")


def label_at(labels: np.ndarray, j: int):
    """One example's label as a dataset yields it: a Python number, or a multi-label 0/1 row."""
    row = labels[j]
    return row.item() if np.ndim(row) == 0 else row


def collate_labels(labels: Sequence):
    """A batch of ``label_at`` values as one tensor: (B,) or, multi-label, (B, L)."""
    return torch.as_tensor(np.stack(labels)) if isinstance(labels[0], np.ndarray) else torch.tensor(labels)


def check_multilabel(table: Table, requested: int | None) -> None:
    """A multi-label table's labels: (N, L) 0/1 with L names, matching ``data.num_classes``."""
    labels = np.asarray(table.labels)
    if labels.ndim != 2:
        raise TunelabError(f"data.task=multilabel needs several 0/1 labels per example, but {table.origin} gives one "
                           "class per example (a folder per class has no multi-label layout). List the examples in "
                           f"a table (data=image_csv, data=text_table) with {LAYOUTS}.")
    if labels.dtype.kind not in "iub" or not np.isin(labels, (0, 1)).all():
        raise TunelabError(f"{table.origin}: multi-label targets must be 0 or 1.")
    found = labels.shape[1]
    if requested is not None and requested != found:
        raise TunelabError(f"data.num_classes={requested} but {table.origin} has {found} labels "
                           f"({first_few(list(table.classes), 12)}). Set data.num_classes={found}, or null.")


def check_single_label(table: Table, task: str) -> None:
    """Several labels per example under a single-label task: say which task takes them."""
    if np.ndim(table.labels) == 2:
        raise TunelabError(f"{table.origin} gives several labels per example; set data.task=multilabel "
                           f"(data.objective=val/map), not {task}.")


def multilabel_strata(labels: np.ndarray) -> np.ndarray:
    """One stratum per row for the seeded split: its rarest positive label (by count over the
    whole table; ties: the first label), rows without a label their own stratum. A label is then
    split in proportion at least across the rows where it is the rarest one, so a rare label
    reaches val and test whenever it has enough examples (the stratum of 1-label rows is exact)."""
    counts = labels.sum(axis=0)
    rank = np.where(labels > 0, counts[None, :], np.iinfo(np.int64).max)
    return np.where(labels.any(axis=1), rank.argmin(axis=1), labels.shape[1])


def attribute_labels(digits: np.ndarray, attributes: dict, origin: str) -> tuple[np.ndarray, list[str]]:
    """Class indices -> (N, L) 0/1 attributes: ``attributes`` maps a label name to the classes
    that have it (``even: [0, 2, 4, 6, 8]``), so the labels are data in the config, not code."""
    if not attributes:
        raise TunelabError(f"data.source.attributes: give at least one label, e.g. {{even: [0, 2, 4, 6, 8]}} ({origin}).")
    present = set(np.unique(digits).tolist())
    labels = np.zeros((len(digits), len(attributes)), dtype=np.int64)
    for column, (name, members) in enumerate(attributes.items()):
        members = list(members) if isinstance(members, Sequence) else [members]
        wrong = [m for m in members if isinstance(m, bool) or not isinstance(m, int) or m not in present]
        if not members or wrong:
            raise TunelabError(f"data.source.attributes.{name} must list classes of {origin} "
                               f"({min(present)}..{max(present)}), got {members}.")
        labels[:, column] = np.isin(digits, members)
    return labels, [str(name) for name in attributes]
