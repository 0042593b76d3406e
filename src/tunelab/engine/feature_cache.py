"""Cached-feature fast path: a head-only stage over a frozen, deterministic backbone trains on
backbone features computed once per split, instead of re-running the backbone every epoch.

Valid only when the features a batch gives are the same every epoch: no random augmentation,
no dropout / drop-path / batch-statistics inside the backbone, and a model that can be split
at its head (``Adapter.features`` / ``classify``). The cached loaders use the same sampler,
seed and batch size as the uncached ones, so a cached run sees the same batches in the same
order and ends with the same head (``tests/engine/test_perf.py`` holds it to that).

The contract with the rest of the engine is explicit: the data module serves a cached split
when its ``use_feature_cache`` cache has one, and a cached batch's inputs arrive as
:class:`BackboneFeatures`, on which ``FineTuneModule.forward`` runs the head alone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

import lightning as L
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset

from tunelab.engine.evaluation import to_device
from tunelab.engine.perf import to_channels_last
from tunelab.engine.strategies import Stage
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)
SETTINGS = ("auto", True, False)


@dataclass(frozen=True)
class CachePlan:
    epochs: range | None  # the epochs whose train and val batches are cached features
    reason: str  # why it is on, or why not

    def describe(self) -> str:
        if self.epochs is None:
            return f"feature cache: off ({self.reason})"
        last = self.epochs.stop - 1
        span = f"epoch {last}" if last == self.epochs.start else f"epochs {self.epochs.start}-{last}"
        return f"feature cache: on for {span} ({self.reason})"


def head_only_epochs(stages: list[Stage], max_epochs: int) -> range | None:
    """The epochs of the first epoch-based stage that trains the head alone."""
    for i, stage in enumerate(stages):
        if stage.unit == "epoch" and tuple(stage.trainable) == ("head",) and not stage.patterns:
            nxt = stages[i + 1] if i + 1 < len(stages) else None
            if nxt is not None and (nxt.unit != "epoch" or nxt.plateau is not None):
                return None  # ends mid-epoch, or when a metric plateaus: the loaders cannot plan the switch
            end = min(nxt.start, max_epochs) if nxt is not None else max_epochs
            return range(stage.start, end) if stage.start < end else None
    return None


def stochastic_backbone(model: nn.Module, head_side: tuple[str, ...], batchnorm: str) -> str | None:
    """Why the backbone's features would differ between two passes over the same input, or None."""
    side = tuple(head_side)
    for name, m in model.named_modules():
        if name and (name in side or name.startswith(tuple(s + "." for s in side))):
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"dropout p={m.p} in backbone module {name!r}"
        if float(getattr(m, "drop_prob", 0.0) or 0.0) > 0:  # timm DropPath
            return f"drop-path {m.drop_prob} in backbone module {name!r}"
        if isinstance(m, _BatchNorm) and batchnorm == "train":
            return f"module.batchnorm=train updates BatchNorm {name!r} from every batch"
    return None


def plan_cache(setting, stages: list[Stage], adapter, datamodule, max_epochs: int, batchnorm: str,
               full_epochs: bool = True, mixing: str | None = None) -> CachePlan:
    """Decide before training whether (and for which epochs) the fast path runs.

    ``auto`` also asks that it pays: computing the cache costs one backbone pass over the
    train and val splits, which only a stage of two or more full epochs earns back.
    """
    if setting not in SETTINGS:
        raise TunelabError(f"perf.cache_features must be auto, true or false, got {setting!r}.")
    if setting is False:
        return CachePlan(None, "perf.cache_features=false")
    epochs = head_only_epochs(stages, max_epochs)
    if epochs is None:
        reason = "no epoch-based stage trains the head alone"
    elif adapter.features is None or adapter.classify is None:
        reason = "this model cannot be split at its head"
    else:
        reason = mixing or datamodule.random_training_inputs() or stochastic_backbone(adapter.model, adapter.head_side, batchnorm)
    if reason is None and setting == "auto" and (len(epochs) < 2 or not full_epochs):
        return CachePlan(None, "the head-only stage is shorter than two full epochs: caching would not pay")
    if reason is None:
        return CachePlan(epochs, "head-only stage over a frozen, deterministic backbone")
    if setting is True:
        raise TunelabError(f"perf.cache_features=true but the cache would change training: {reason}. "
                           "Remove that cause or set perf.cache_features=auto.")
    return CachePlan(None, reason)


class BackboneFeatures(NamedTuple):
    """A batch of cached backbone features: the inputs of the head, not of the model."""

    values: torch.Tensor


def _collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[BackboneFeatures, torch.Tensor]:
    features, targets = zip(*items)
    return BackboneFeatures(torch.stack(features)), torch.stack(targets)


class _Features(Dataset):
    """Cached features by position; takes the ``(epoch, index)`` keys of the training sampler."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor):
        self.features, self.targets = features, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key):
        i = key[1] if isinstance(key, tuple) else key
        return self.features[i], self.targets[i]


class FeatureCache(L.Callback):
    """Computes the features when a cached epoch first needs them and serves the loaders.

    The datamodule asks :meth:`loader` for every train/val loader; Lightning is told to rebuild
    its loaders exactly at the epochs where cached and uncached epochs meet.
    """

    def __init__(self, plan: CachePlan, adapter):
        self.plan, self.adapter = plan, adapter
        self.cached: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.module = None
        self.user_reload = 0

    def active(self, epoch: int) -> bool:
        return self.plan.epochs is not None and epoch in self.plan.epochs

    # -- hooks ------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.module = pl_module
            self.user_reload = trainer.reload_dataloaders_every_n_epochs
            trainer.datamodule.use_feature_cache(self)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        switching = self.active(epoch) != self.active(epoch + 1)
        trainer.reload_dataloaders_every_n_epochs = 1 if switching else self.user_reload
        if self.active(epoch) and not self.active(epoch + 1):
            self.cached.clear()  # the rest of the run reads images again: free the memory

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            trainer.reload_dataloaders_every_n_epochs = self.user_reload
            trainer.datamodule.use_feature_cache(None)
            self.cached.clear()

    # -- loaders ----------------------------------------------------------------------------
    def loader(self, split: str, datamodule) -> DataLoader | None:
        trainer = self.module.trainer if self.module is not None else None
        if trainer is None or trainer.state.fn != "fit" or not self.active(trainer.current_epoch):
            return None
        if not self.cached:
            with torch.random.fork_rng(devices=[]):  # leaves the stream dropout draws from untouched
                self._compute(datamodule)
        features, targets = self.cached[split]
        training = split == "train"
        return DataLoader(
            _Features(features, targets),
            batch_size=datamodule.batch_size if training else datamodule.eval_batch_size,
            sampler=datamodule.train_sampler(len(targets)) if training else None,
            collate_fn=_collate,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(datamodule.seed),  # as the image loaders: no global draw
        )

    @torch.no_grad()  # not inference_mode: its tensors could not be saved for the head's backward
    def _compute(self, datamodule) -> None:
        module, started = self.module, time.perf_counter()
        was_training = module.training
        model = module.model.eval()
        try:
            for split in ("train", "val"):
                dataset = datamodule.dataset(split, training=split == "train")
                # the training batch size: it fits (with gradients, even), and on CPU large
                # batches run slower per sample (EfficientNet-Lite0 at 64 px: 563/s at 64, 333/s at 256)
                loader = DataLoader(dataset, batch_size=datamodule.batch_size, num_workers=datamodule.num_workers,
                                    collate_fn=datamodule.collate)
                feats, targets = [], []
                for x, y in loader:
                    feats.append(self.adapter.features(model, self._prepared(x)).float().cpu())
                    targets.append(y)
                self.cached[split] = torch.cat(feats), torch.cat(targets)
            self._check(model, datamodule)
        finally:
            module.train(was_training)
        sizes = ", ".join(f"{len(t):,} {s}" for s, (_, t) in self.cached.items())
        log.info("feature cache: %s backbone features (%d-d) computed once in %.1f s; the head trains on them",
                 sizes, self.cached["train"][0].shape[1], time.perf_counter() - started)

    def _prepared(self, x):
        """A model input on the module's device, laid out as ``FineTuneModule.forward`` feeds it."""
        x = to_device(x, self.module.device)
        return to_channels_last(x) if self.module.channels_last else x

    def _check(self, model: nn.Module, datamodule) -> None:
        """classify(features(x)) must be model(x): a wrong split would train a different head."""
        x = self._prepared(datamodule.first_inputs("val", 4))
        direct = model(x).float()
        split = self.adapter.classify(model, self.adapter.features(model, x)).float()
        if not torch.allclose(direct, split, atol=1e-4, rtol=1e-3):
            raise TunelabError(f"feature cache: this model's head split does not reproduce its output "
                               f"(max diff {(direct - split).abs().max():.2e}); set perf.cache_features=false.")
