"""FineTuneModule: loss, metrics and an optimizer with one param group per layer group.

Classification (cross-entropy; accuracy, precision, recall, F1, AUROC) or regression (MSE on
standardised targets; MSE, MAE, R² in the data's units), for any adapter's model.

Every layer group is in the optimizer from step 0 (split only into decay / no-decay);
a stage change flips ``requires_grad`` and the group's LR multiplier, never the groups
themselves, so schedulers, checkpoints and DDP see one fixed optimizer layout.

The LR of a param group at optimizer step ``t`` is, in closed form:
    base_lr × shape(t, total) × rewarmup(t) × stage_mult[group] × layer_scale[group]
where ``shape`` is the scheduler, ``rewarmup`` restarts a linear warmup at each stage start
(``stage_rewarmup`` steps), and ``layer_scale`` is layer decay × explicit multipliers.
"""

from __future__ import annotations

from typing import Annotated, Callable

import lightning as L
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from tunelab.adapters import Adapter
from tunelab.config.settings import EXTENSION, POSITIVE, integer, mapping, reads
from tunelab.engine.batchnorm import check_mode, hold_running_stats
from tunelab.engine.feature_cache import BackboneFeatures
from tunelab.engine.loss_watch import LossWatch
from tunelab.engine.losses import check_loss, task_default
from tunelab.engine.mixing import BatchMixer
from tunelab.engine.metrics import SoftmaxAUROC, epoch_auroc, task_metrics
from tunelab.engine.param_groups import LAYER_DECAY, layer_scales, param_groups
from tunelab.engine.perf import checkpoint_activations, compile_model, compile_options, fused_kwargs, to_channels_last
from tunelab.engine.schedules import constant
from tunelab.engine.strategies import Stage
from tunelab.errors import TunelabError



@reads("module", noun="module")
class FineTuneModule(L.LightningModule):
    def __init__(
        self,
        adapter: Adapter,
        num_outputs: int,
        stages: list[Stage],
        task: str = "classification",
        target_stats: tuple[float, float] | None = None,
        perf: dict | None = None,
        threshold: float = 0.5,  # multilabel: data.threshold, where a label's probability counts as the label
        /,
        *,
        # extension points: each built from the top-level config node of its name (build_parts)
        optimizer: Annotated[Callable[..., torch.optim.Optimizer], EXTENSION],
        scheduler: Annotated[Callable[[int, int], float] | None, EXTENSION] = None,
        regularizer: Annotated[nn.Module | None, EXTENSION] = None,
        loss: Annotated[Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, EXTENSION] = None,
        mixup: Annotated[BatchMixer | None, EXTENSION] = None,
        # the module.* settings
        batchnorm: str = "eval",
        layer_decay: Annotated[float, LAYER_DECAY] = 1.0,
        group_lr_mults: Annotated[dict | None, mapping(POSITIVE)] = None,
        stage_rewarmup: Annotated[int, integer(0)] = 0,
    ):
        super().__init__()
        self.model = adapter.model
        self.groups = adapter.groups
        self.stages = stages
        self.optimizer_factory = optimizer
        self.lr_shape = scheduler or constant
        self.regularizer = regularizer
        self.loss_fn = loss or task_default(task)  # engine/losses.py; none named: the task's usual loss
        check_loss(self.loss_fn, task)
        self.mixer = mixup  # engine/mixing.py: mixes training batches; the loss gets soft targets
        if mixup is not None and not getattr(self.loss_fn, "soft_targets", True) and task == "classification":
            raise TunelabError(f"mixup gives class probabilities as targets, which the loss {type(self.loss_fn).__name__} "
                               "does not take; use loss=cross_entropy or weighted_cross_entropy, or mixup=none.")
        self.batchnorm = check_mode(batchnorm)  # engine/batchnorm.py
        self.layer_scale = layer_scales([g.name for g in self.groups], layer_decay, group_lr_mults)
        self.stage_rewarmup = int(stage_rewarmup)
        self.stage_index, self.stage_start_step = -1, 0
        self.lr_mult = {g.name: 0.0 for g in self.groups}
        self.lr_history: list[tuple[int, dict[str, float]]] = []  # (step, LR per layer group)
        self.loss_watch = LossWatch()  # fails the run on a non-finite training loss
        self.stage_log: list[tuple[int, str]] = []  # (start step, stage name) as applied
        self._scheduler: LambdaLR | None = None
        self._total_steps = 1
        self.task = task
        self._set_perf(dict(perf or {}), adapter)
        self.classify = adapter.classify
        # Regression heads learn standardised targets; predictions are mapped back to the
        # data's units for the loss-independent metrics (MSE/MAE/R² in the units users know).
        mean, std = target_stats or (0.0, 1.0)
        self.register_buffer("target_mean", torch.tensor(float(mean)))
        self.register_buffer("target_std", torch.tensor(float(std)))
        self._set_metrics(task, num_outputs, threshold)

    def _set_perf(self, perf: dict, adapter: Adapter) -> None:
        """Speed options (perf.py): none of them changes what is computed beyond float tolerance."""
        self.compile_options = compile_options(perf)
        if perf.get("activation_checkpointing"):  # before any compilation: the graph traces the checkpoints
            checkpoint_activations(adapter, self.batchnorm)
        self.channels_last = bool(perf.get("channels_last", False))
        self.fused_optimizer = perf.get("fused_optimizer", "auto")
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.compiles = 0  # how often the model was (re)compiled: once per change of the trainable set
        self._compiled_for: frozenset[str] | None = None
        self.__dict__["_compiled"] = None  # not a submodule: checkpoints hold the plain model only

    def _set_metrics(self, task: str, num_outputs: int, threshold: float = 0.5) -> None:
        # multilabel: metrics.multilabel_metrics; no train/acc, confusion matrix or AUROC (single-label metrics)
        self.train_acc = MulticlassAccuracy(num_outputs, average="micro") if task == "classification" else None
        self.val_metrics = task_metrics(task, num_outputs, threshold).clone(prefix="val/")
        self.test_metrics = task_metrics(task, num_outputs, threshold).clone(prefix="test/")
        # Kept across the test epoch (never logged as a scalar): train() plots it after testing.
        self.test_confusion = MulticlassConfusionMatrix(num_outputs) if task == "classification" else None
        self.test_confusion_matrix: torch.Tensor | None = None  # set when a test epoch ends (on_test_epoch_end)
        # Outside the collections: computed at epoch end, and not logged when undefined (_log_auroc).
        self.auroc = (nn.ModuleDict({s: SoftmaxAUROC(num_outputs) for s in ("val", "test")})
                      if task == "classification" else None)
        self._auroc_noted: set[str] = set()  # splits whose missing classes were already reported

    def forward(self, x) -> torch.Tensor:
        """Logits (classification) or predictions in the targets' units (regression).
        ``x`` is an image batch, the dict a tokenizer / feature extractor produced, or cached
        backbone features (feature_cache.py), which only the head reads."""
        if isinstance(x, BackboneFeatures):
            out = self.classify(self.model, x.values)
        else:
            if self.channels_last:
                x = to_channels_last(x)
            compiled = self.__dict__["_compiled"]
            out = (self.model if compiled is None else compiled)(x)
        if self.task == "regression":
            return out.squeeze(-1) * self.target_std + self.target_mean
        return out

    # -- stages --------------------------------------------------------------------------
    def set_stage(self, index: int, start_step: int | None = None) -> Stage:
        """Make ``stages[index]`` current: trainable set, LR multipliers, BatchNorm mode, LRs now."""
        stage = self.stages[index]
        named = dict(self.model.named_parameters())
        for g in self.groups:
            flags = [stage.trains(g.name, n) for n in g.param_names]
            for n, flag in zip(g.param_names, flags):
                named[n].requires_grad_(flag)
            self.lr_mult[g.name] = stage.mult(g.name) * self.layer_scale[g.name] if any(flags) else 0.0
        self.stage_index = index
        self.stage_start_step = self.global_step if start_step is None else start_step
        self.stage_log.append((self.global_step, stage.name))
        self.train(self.training)  # re-applies the BatchNorm mode for the new trainable set
        self._refresh_lrs()  # take effect on the very next step, not one step late
        self._recompile()
        return stage

    def _recompile(self) -> None:
        """Compile again whenever the trainable set changed, so frozen layers skip their backward."""
        trainable = frozenset(n for n, p in self.model.named_parameters() if p.requires_grad)
        if self.compile_options is None or trainable == self._compiled_for:
            return
        self.__dict__["_compiled"] = compile_model(self.model, self.compile_options)
        self._compiled_for = trainable
        self.compiles += 1

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            hold_running_stats(self.model, self.batchnorm)
        return self

    # -- learning rates ----------------------------------------------------------------------
    def lr_factor(self, group: str, step: int) -> float:
        """Everything but the base LR, for ``group`` at optimizer step ``step`` (see module doc)."""
        factor = self.lr_shape(step, self._total_steps) * self.lr_mult[group]
        if self.stage_rewarmup and self.stage_index > 0:
            factor *= min(1.0, (step - self.stage_start_step + 1) / self.stage_rewarmup)
        return factor

    def _refresh_lrs(self) -> None:
        if self._scheduler is not None:
            sched = self._scheduler
            for pg, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                pg["lr"] = base * fn(sched.last_epoch)

    def group_lrs(self) -> dict[str, float]:
        if self._scheduler is None:
            return {}
        return {pg["layer_group"]: pg["lr"] for pg in self._scheduler.optimizer.param_groups}

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(param_groups(self.model, self.groups), **fused_kwargs(self.optimizer_factory, self.fused_optimizer,
                                                                        self.device))
        # The real number of optimizer steps: accumulation and limit_train_batches included.
        self._total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        lambdas = [(lambda step, g=pg["layer_group"]: self.lr_factor(g, step)) for pg in optimizer.param_groups]
        self._scheduler = LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self._scheduler, "interval": "step"}}

    # -- steps -----------------------------------------------------------------------------
    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task == "regression":  # the loss sees the standardised scale the head learns
            out, y = (out - self.target_mean) / self.target_std, (y - self.target_mean) / self.target_std
        return self.loss_fn(out, y)

    def _targets(self, y: torch.Tensor) -> torch.Tensor:
        return y.float() if self.task in ("regression", "multilabel") else y  # multilabel: 0/1 floats for the loss

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Runs after the StageCallback's hook: these are the LRs this step will use.
        self.lr_history.append((self.global_step, self.group_lrs()))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        y, n = self._targets(y), len(y)
        target = y
        if self.mixer is not None and not isinstance(x, BackboneFeatures):
            x, target = self.mixer(x, y, self.global_step, self.global_rank)
        logits = self(x)
        loss = self._loss(logits, target)
        if self.regularizer is not None:
            penalty = self.regularizer(self.model)
            self.log("train/reg_loss", penalty, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
            loss = loss + penalty
        self.loss_watch.add(self.global_step, self.current_epoch, loss, self._lrs_at)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        if self.train_acc is not None:
            self.train_acc(logits, y)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def _lrs_at(self, step: int) -> dict[str, float]:
        return dict(self.lr_history).get(step, self.group_lrs())

    def _eval_step(self, batch, metrics: MetricCollection, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        y, n = self._targets(y), len(y)
        logits = self(x)
        # sync_dist: under DDP every rank saw a shard; the logged value is the mean over ranks
        self.log(f"{prefix}/loss", self._loss(logits, y), prog_bar=prefix == "val", batch_size=n, sync_dist=True)
        metrics(logits, y)
        self.log_dict(metrics, prog_bar=False, batch_size=n)
        if self.auroc is not None:
            self.auroc[prefix].update(logits, y)
        return logits, y

    def _log_auroc(self, split: str) -> None:
        """Log ``<split>/auroc`` over the epoch's predictions (metrics.epoch_auroc), then free them."""
        metric = self.auroc[split]
        if not self.trainer.sanity_checking and metric.update_count:  # sanity batches are not the split
            value = epoch_auroc(metric, split, self._auroc_noted, self.trainer.is_global_zero)
            if value is not None:  # sync_dist only averages equal values; it keeps Lightning quiet
                self.log(f"{split}/auroc", value, sync_dist=True)
        metric.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def on_test_epoch_start(self) -> None:
        if self.test_confusion is not None:
            self.test_confusion.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        logits, y = self._eval_step(batch, self.test_metrics, "test")
        if self.test_confusion is not None:
            self.test_confusion.update(logits, y)

    def on_train_epoch_end(self) -> None:
        self.loss_watch.check(self._lrs_at)
        self.log("stage", float(self.stage_index), sync_dist=True)  # the stage in force when the epoch ended

    def on_test_epoch_end(self) -> None:
        if self.auroc is not None:
            self._log_auroc("test")
        if self.test_confusion is not None:
            # gathered here, on the test device: after trainer.test() the module is back on the CPU,
            # and NCCL cannot gather CPU tensors
            self.test_confusion_matrix = self.test_confusion.compute().cpu()

    def on_validation_epoch_end(self) -> None:
        if self.auroc is not None:  # before the plateau update below: it may monitor val/auroc
            self._log_auroc("val")
        update = getattr(self.lr_shape, "update", None)
        if update is None or self.trainer.sanity_checking:
            return
        monitor = self.lr_shape.monitor
        if monitor not in self.trainer.callback_metrics:
            raise TunelabError(f"scheduler.monitor={monitor!r} is not a logged metric; "
                               f"logged: {sorted(self.trainer.callback_metrics)}.")
        update(float(self.trainer.callback_metrics[monitor]))
        self._refresh_lrs()

    # -- checkpoints: the stage and schedule position travel with the weights ---------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tunelab"] = {
            "stage_index": self.stage_index,
            "stage_start_step": self.stage_start_step,
            "schedule": self.lr_shape.state_dict() if hasattr(self.lr_shape, "state_dict") else None,
            # the resolved config and model meta (engine.recipe.store_description), plain containers:
            # a .ckpt copied alone still says how to rebuild its model (trained.from_checkpoint)
            **(getattr(self, "stored_run", None) or {}),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("tunelab") or {}
        self.restored_stage = (state.get("stage_index", -1), state.get("stage_start_step", 0))
        if state.get("schedule") is not None and hasattr(self.lr_shape, "load_state_dict"):
            self.lr_shape.load_state_dict(state["schedule"])
