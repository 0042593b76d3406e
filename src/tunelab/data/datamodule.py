"""DataModules: deterministic stratified splits and sized loaders for every modality.

``TaskDataModule`` reads a source's ``Table`` once, checks its labels, fixes the splits and
builds the loaders; a modality subclass only says how an item becomes a tensor (``dataset``)
and how a batch is assembled (``collate``): ``data/images.py``, ``data/text.py`` and
``data/audio.py``."""

from __future__ import annotations

import logging
import os
from typing import Annotated, Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from tunelab.config.settings import FRACTION, SEED, checked, choice, either, integer, number
from tunelab.data.sampling import EpochSampler
from tunelab.data.multilabel import check_multilabel, check_single_label, multilabel_strata
from tunelab.data.table import Table, check_task
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)


def stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Split indices class by class so every split keeps the class balance; same seed, same split."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        cuts = np.cumsum([round(f * len(idx)) for f in fractions])
        for part, chunk in zip(parts, np.split(idx, cuts)):
            part.extend(chunk.tolist())
    # Mixed, not sorted: sources often list images class by class (mnist_5k does), and a
    # truncated evaluation (limit_val_batches) must still see every class.
    return [rng.permutation(np.array(p, dtype=np.int64)) for p in parts]


def resolve_workers(num_workers: int | str) -> int:
    if num_workers == "auto":
        # Leave a core to the training process; beyond 8 workers small images gain nothing.
        return max(0, min(8, (os.cpu_count() or 1) - 1))
    return int(num_workers)


METRICS = {"classification": ("loss", "acc", "precision", "recall", "f1", "auroc"),
           "multilabel": ("loss", "map", "f1", "f1_micro", "precision", "recall", "exact_match"),
           "regression": ("loss", "mse", "mae", "r2")}
DEFAULT_OBJECTIVE = {"classification": "val/acc", "multilabel": "val/map", "regression": "val/mse"}


def check_objective(task: str, objective: str | None, mode: str) -> tuple[str, str]:
    """The metric checkpoints and sweeps follow must be one this task logs on validation."""
    objective = objective or DEFAULT_OBJECTIVE[task]
    valid = [f"val/{m}" for m in METRICS[task]]
    if objective not in valid:
        raise TunelabError(f"data.objective={objective!r} is not a validation metric of a {task} task; "
                           f"use one of {', '.join(valid)}.")
    if mode not in ("min", "max"):
        raise TunelabError(f"data.objective_mode must be min or max, got {mode!r}.")
    return objective, mode


def regression_strata(targets: np.ndarray, bins: int = 5) -> np.ndarray:
    """Quantile bins of regression targets, so splits keep the target distribution."""
    edges = np.unique(np.quantile(targets, np.linspace(0, 1, bins + 1)[1:-1]))
    return np.digitize(targets, edges)


class TaskDataModule(L.LightningDataModule):
    """Splits and loaders shared by every modality; subclasses implement ``dataset``."""

    modality = "none"  # which adapters can read it: image, text or audio

    @checked("data")
    def __init__(
        self,
        source: Callable[[], Table],
        name: str = "data",
        task: str = "classification",
        num_classes: Annotated[int | None, integer(2, null=True)] = None,
        batch_size: Annotated[int, integer(1)] = 64,
        eval_batch_size: Annotated[int | None, integer(1, null=True)] = None,
        val_fraction: Annotated[float, FRACTION] = 0.1,
        test_fraction: Annotated[float, FRACTION] = 0.2,
        max_train_samples: Annotated[int | None, integer(1, null=True)] = None,
        samples_per_class: Annotated[int | None, integer(1, null=True)] = None,
        min_epoch_samples: Annotated[int | None, integer(1, null=True)] = None,
        seed: Annotated[int, SEED] = 0,
        num_workers: Annotated[int | str, either(choice("auto"), integer(0))] = "auto",
        objective: str | None = None,
        objective_mode: str = "max",
        sampler: Annotated[str, choice("shuffle", "balanced")] = "shuffle",
        threshold: Annotated[float, number(0, 1, low_open=True, high_open=True)] = 0.5,
    ):
        super().__init__()
        if val_fraction + test_fraction >= 1:
            raise TunelabError(f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must sum below 1.")
        self.source, self.name, self.task = source, name, check_task(task)
        self.objective, self.objective_mode = check_objective(task, objective, objective_mode)
        self.requested_classes = num_classes
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.max_train_samples, self.seed = max_train_samples, seed
        self.samples_per_class, self.min_epoch_samples = samples_per_class, min_epoch_samples
        if samples_per_class and task != "classification":
            raise TunelabError(f"data.samples_per_class needs a classification task, not {task}; use "
                               "data.max_train_samples instead.")
        if sampler == "balanced" and task != "classification":
            raise TunelabError(f"data.sampler=balanced draws classes equally often: it needs a classification task, "
                               f"not {task}; use data.sampler=shuffle (or class weights in the loss).")
        self.sampler = sampler
        self.threshold = float(threshold)  # multilabel: a label is predicted when its sigmoid is above it
        self.num_workers = resolve_workers(num_workers)
        self.table: Table | None = None
        self.splits: dict[str, tuple[Table, np.ndarray]] = {}
        self.model_data_config: dict = {}
        self.feature_cache = None  # a FeatureCache during fit when a stage trains on cached features

    # -- reading and checking the data happens once, before the model is built ---------------
    def scan(self) -> "TaskDataModule":
        """Read the source, check labels against ``num_classes`` and fix the splits."""
        if self.table is not None:
            return self
        table = self.source()
        if len(table) == 0:
            raise TunelabError(f"data source {table.origin} holds no labelled examples.")
        self._check_labels(table)
        strata = {"classification": lambda y: y, "multilabel": multilabel_strata,
                  "regression": regression_strata}[self.task](table.labels)
        if table.test is not None:
            self._check_labels(table.test)
            train, val = stratified_split(strata, (self.val_fraction,), self.seed)[::-1]
            self.splits = {"train": (table, train), "val": (table, val), "test": (table.test, np.arange(len(table.test)))}
        else:
            test, val, train = stratified_split(strata, (self.test_fraction, self.val_fraction), self.seed)
            self.splits = {"train": (table, train), "val": (table, val), "test": (table, test)}
        self.splits["train"] = self._subset(*self.splits["train"])
        empty = [name for name, (_, idx) in self.splits.items() if len(idx) == 0]
        if empty:
            raise TunelabError(f"{table.origin}: {len(table)} examples leave the {', '.join(empty)} split(s) empty; "
                               "add data or change data.val_fraction / data.test_fraction.")
        self.table = table
        return self

    def _subset(self, table: Table, train: np.ndarray) -> tuple[Table, np.ndarray]:
        """The training examples kept by data.samples_per_class (the first k of each class in a
        seeded shuffle: a few-shot set) and then data.max_train_samples (a seeded random subset)."""
        if self.samples_per_class:
            order = train[np.random.default_rng(self.seed).permutation(len(train))]
            labels = table.labels[order]
            classes = np.unique(labels)
            picked = [order[labels == c][: self.samples_per_class] for c in classes]
            short = {table.classes[c]: len(p) for c, p in zip(classes, picked) if len(p) < self.samples_per_class}
            if short:
                log.warning("data.samples_per_class=%d: %d class(es) have fewer training examples: %s",
                            self.samples_per_class, len(short), short)
            train = np.sort(np.concatenate(picked))
        if self.max_train_samples:
            train = train[np.random.default_rng(self.seed).permutation(len(train))[: self.max_train_samples]]
        return table, train

    def _check_labels(self, table: Table) -> None:
        if self.task == "multilabel":
            return check_multilabel(table, self.requested_classes)
        check_single_label(table, self.task)
        if self.task == "regression":
            if table.labels.dtype.kind != "f" or not np.isfinite(table.labels).all():
                raise TunelabError(f"{table.origin}: regression targets must be finite numbers.")
            return
        if table.labels.dtype.kind not in "iu":
            raise TunelabError(f"{table.origin} has non-integer labels; set data.task=regression for numeric "
                               "targets, or give class indices / names.")
        found = int(table.labels.max()) + 1
        if self.requested_classes is not None and found > self.requested_classes:
            first = int(np.flatnonzero(table.labels >= self.requested_classes)[0])
            item = table.items[first]
            shown = str(item) if os.path.exists(str(item)) or len(str(item)) <= 60 else f"{str(item)[:57]}..."
            example = f", first at {shown!r}" if isinstance(item, (str, os.PathLike)) else ""  # a path or a text
            raise TunelabError(
                f"data.num_classes={self.requested_classes} but {table.origin} has labels up to {found - 1}{example} "
                f"({found} classes: {', '.join(table.classes[:12])}{'...' if found > 12 else ''}). "
                f"Set data.num_classes={found}, or null to infer it from the data."
            )
        if table.labels.min() < 0:
            raise TunelabError(f"{table.origin} has negative labels; labels must be class indices 0..K-1.")
        named = len(table.classes)  # folders, label names, or 0..K-1 for integer labels
        if self.requested_classes is not None and self.requested_classes != named:
            # more outputs than classes: logits no example ever trains, metrics averaged over phantoms
            extra = self.requested_classes - named
            why = (f"{extra} output(s) would never see an example" if extra > 0
                   else f"{-extra} class(es) would have no output")
            shown = ", ".join(table.classes[:12]) + ("..." if named > 12 else "")
            raise TunelabError(f"data.num_classes={self.requested_classes} but {table.origin} names {named} classes "
                               f"({shown}): {why}. Set data.num_classes={named}, or null to infer it from the data.")

    @property
    def num_classes(self) -> int:
        """Classes of a classification task, labels of a multilabel one (0 for regression)."""
        self.scan()
        if self.task == "regression":
            return 0
        return self.requested_classes or len(self.table.classes)

    @property
    def num_outputs(self) -> int:
        """Width of the model's new head: one logit per class, or one regression output."""
        return 1 if self.task == "regression" else self.num_classes

    @property
    def classes(self) -> list[str]:
        self.scan()
        return list(self.table.classes)  # as many as num_classes: scan() refuses a mismatch

    def target_stats(self) -> tuple[float, float] | None:
        """Mean and std of the training targets (regression): the model learns standardised
        targets, so a new head starting near zero predicts the mean, whatever the units."""
        if self.task != "regression":
            return None
        table, idx = self.scan().splits["train"]
        y = table.labels[idx].astype(np.float64)
        return float(y.mean()), float(max(y.std(), 1e-6))

    def split_sizes(self) -> dict[str, int]:
        self.scan()
        return {name: len(idx) for name, (_, idx) in self.splits.items()}

    # -- what the model needs from the data, and what the data needs from the model ----------
    @property
    def model_kwargs(self) -> dict:
        """Extra arguments for the model adapter (e.g. the image size of a fixed-size ViT)."""
        return {}

    def set_model_data_config(self, data_config: dict) -> None:
        """Normalisation, tokenizer or feature extractor: whatever the pretrained model expects."""
        self.model_data_config = dict(data_config)

    def dataset(self, split: str, training: bool = False) -> Dataset:
        raise NotImplementedError

    def random_training_inputs(self) -> str | None:
        """Why a training sample may differ from epoch to epoch (random augmentation), or None."""
        return None

    def collate(self, batch: list):
        return default_collate(batch)

    def loader(self, split: str, training: bool = False) -> DataLoader:
        """A split's loader: shuffled by epoch and augmented when ``training``, else in order."""
        dataset = self.dataset(split, training=training)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if training else self.eval_batch_size,
            sampler=self.train_sampler(len(dataset)) if training else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
            collate_fn=self.collate,
            # worker seeds from a private generator: starting workers never shifts the global
            # RNG stream that dropout draws from (so resumed runs match uninterrupted ones)
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_sampler(self, size: int) -> EpochSampler:
        """The training order (also used by the feature cache, so cached epochs see the same batches)."""
        weights = None
        if self.sampler == "balanced":  # 1 / class count per sample: each class drawn equally often
            table, idx = self.splits["train"]
            labels = torch.as_tensor(table.labels[idx], dtype=torch.long)
            weights = 1.0 / torch.bincount(labels, minlength=self.num_classes).double()[labels]
        return EpochSampler(size, self.seed, min_samples=self.min_epoch_samples, weights=weights)

    def class_counts(self) -> list[int] | None:
        """Training examples per class (classification) or positives per label (multilabel), for
        balanced class weights; else None."""
        if self.task == "regression":
            return None
        table, idx = self.scan().splits["train"]
        if self.task == "multilabel":
            return table.labels[idx].sum(axis=0).astype(int).tolist()
        return np.bincount(table.labels[idx], minlength=self.num_classes).tolist()

    def first_inputs(self, split: str, count: int):
        """The first ``count`` model inputs of a split, collated as training collates them."""
        loader = DataLoader(self.dataset(split), batch_size=count, collate_fn=self.collate)
        return next(iter(loader))[0]

    def ood_names(self) -> list[str]:
        """Shifted evaluation splits declared in the data config (``data.ood``)."""
        return list(getattr(self, "ood", {}) or {})

    def ood_loader(self, name: str) -> DataLoader:
        return DataLoader(self.ood_dataset(name), batch_size=self.eval_batch_size, num_workers=self.num_workers,
                          collate_fn=self.collate)

    def ood_dataset(self, name: str) -> Dataset:
        raise TunelabError(f"data={self.name} ({self.modality}) declares no way to build OOD split {name!r}.")

    def use_feature_cache(self, cache) -> None:
        """Serve train/val loaders from ``cache.loader(split, self)`` whenever it has one; None: never.
        (engine/feature_cache.py's FeatureCache, for the epochs of a head-only stage.)"""
        self.feature_cache = cache

    def train_dataloader(self) -> DataLoader:
        cached = self.feature_cache.loader("train", self) if self.feature_cache else None
        return cached or self.loader("train", training=True)

    def val_dataloader(self) -> DataLoader:
        cached = self.feature_cache.loader("val", self) if self.feature_cache else None
        return cached or self.loader("val", training=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", training=False)
