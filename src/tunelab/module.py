"""FineTuneModule: loss, metrics and an optimizer with one param group per layer group.

Every layer group is in the optimizer from step 0 (split only into decay / no-decay);
a stage change flips ``requires_grad`` and the group's LR multiplier, never the groups
themselves, so schedulers, checkpoints and DDP see one fixed optimizer layout.
"""

from __future__ import annotations

from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall,
)

from tunelab.adapters import Adapter
from tunelab.errors import TunelabError
from tunelab.schedules import constant
from tunelab.strategies import Stage


def _no_decay(name: str, param: torch.Tensor) -> bool:
    # Biases and norm scales/shifts (all 1-D) are not pulled toward zero: decaying them
    # only hurts, and for a frozen-then-unfrozen norm layer it would be pure drift.
    return param.ndim <= 1 or name.endswith(".bias")


# How BatchNorm layers behave in training mode:
#   frozen_eval: layers of frozen groups use their running statistics (and never update
#                them); trainable groups' layers normalise with batch statistics.
#   eval:        every layer always uses (and keeps) its running statistics: the Keras
#                fine-tuning recipe, for small batches or data far from the pretraining set.
#   train:       plain PyTorch behaviour; frozen layers' statistics drift too.
BATCHNORM_MODES = ("frozen_eval", "eval", "train")


def classification_metrics(num_classes: int) -> MetricCollection:
    return MetricCollection({
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "precision": MulticlassPrecision(num_classes, average="macro"),
        "recall": MulticlassRecall(num_classes, average="macro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    })


class FineTuneModule(L.LightningModule):
    def __init__(
        self,
        adapter: Adapter,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        stages: list[Stage],
        scheduler: Callable[[int, int], float] | None = None,
        label_smoothing: float = 0.0,
        batchnorm: str = "frozen_eval",
    ):
        super().__init__()
        self.model = adapter.model
        self.groups = adapter.groups
        self.stages = stages
        self.optimizer_factory = optimizer
        self.lr_shape = scheduler or constant
        self.label_smoothing = label_smoothing
        if batchnorm not in BATCHNORM_MODES:
            raise TunelabError(f"module.batchnorm must be one of {', '.join(BATCHNORM_MODES)}, got {batchnorm!r}.")
        self.batchnorm = batchnorm
        self.stage_index = -1
        self.lr_mult = {g.name: 0.0 for g in self.groups}
        self._scheduler: LambdaLR | None = None
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_metrics = classification_metrics(num_classes).clone(prefix="val/")
        self.test_metrics = classification_metrics(num_classes).clone(prefix="test/")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # -- stages --------------------------------------------------------------------------
    def params_per_group(self) -> dict[str, int]:
        named = dict(self.model.named_parameters())
        return {g.name: sum(named[n].numel() for n in g.param_names) for g in self.groups}

    def set_stage(self, index: int) -> Stage:
        """Make ``stages[index]`` current: trainable set, LR multipliers, frozen-BN mode, LRs now."""
        stage = self.stages[index]
        named = dict(self.model.named_parameters())
        for g in self.groups:
            for n in g.param_names:
                named[n].requires_grad_(g.name in stage.trainable)
            self.lr_mult[g.name] = stage.mult(g.name)
        self.stage_index = index
        self.train(self.training)  # re-applies the BatchNorm mode for the new frozen set
        if self._scheduler is not None:  # take effect on the very next step, not one step late
            sched = self._scheduler
            for pg, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                pg["lr"] = base * fn(sched.last_epoch)
        return stage

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.batchnorm != "train":
            for m in self.model.modules():
                if not isinstance(m, _BatchNorm):
                    continue
                frozen = m.weight is None or not m.weight.requires_grad
                if self.batchnorm == "eval" or frozen:
                    m.eval()
        return self

    def group_lrs(self) -> dict[str, float]:
        if self._scheduler is None:
            return {}
        return {pg["layer_group"]: pg["lr"] for pg in self._scheduler.optimizer.param_groups}

    # -- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self):
        named = dict(self.model.named_parameters())
        param_groups = []
        for g in self.groups:
            decay = [named[n] for n in g.param_names if not _no_decay(n, named[n])]
            plain = [named[n] for n in g.param_names if _no_decay(n, named[n])]
            if decay:
                param_groups.append({"params": decay, "layer_group": g.name})
            if plain:
                param_groups.append({"params": plain, "layer_group": g.name, "weight_decay": 0.0})
        optimizer = self.optimizer_factory(param_groups)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        shape, mult = self.lr_shape, self.lr_mult
        lambdas = [
            (lambda step, g=pg["layer_group"]: shape(step, total) * mult[g]) for pg in optimizer.param_groups
        ]
        self._scheduler = LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self._scheduler, "interval": "step"}}

    # -- steps -----------------------------------------------------------------------------
    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self._loss(logits, y)
        if not torch.isfinite(loss):
            lrs = ", ".join(f"{g}={lr:.3g}" for g, lr in self.group_lrs().items() if lr > 0)
            raise TunelabError(
                f"training loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); "
                f"LRs: {lrs}. Lower optimizer.lr, add warmup, or check the inputs."
            )
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch, metrics: MetricCollection, prefix: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{prefix}/loss", self._loss(logits, y), prog_bar=prefix == "val")
        metrics(logits, y)
        self.log_dict(metrics, prog_bar=False)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def on_train_epoch_start(self) -> None:
        # Runs after the StageCallback's hook, so these are the LRs the epoch starts with.
        for group, lr in self.group_lrs().items():
            # MLflow metric names allow no "+", which joins module names in group names.
            self.log(f"lr/{group.replace('+', '_')}", lr, on_step=False, on_epoch=True)
        self.log("stage", float(self.stage_index), on_step=False, on_epoch=True)
