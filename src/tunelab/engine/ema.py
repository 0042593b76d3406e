"""An exponential moving average of the weights (``ema=default``), on timm's ``ModelEmaV3``.

After every optimizer step the average moves toward the weights: ``ema = d·ema + (1 − d)·w``,
where ``d`` is ``decay`` or, with ``warmup``, ``min(decay, 1 − (1 + t/warmup_gamma)^−warmup_power)``
at optimizer step ``t`` (timm's warmup: a short fine-tune would otherwise average in the
pretrained backbone and the random head for thousands of steps). The first step copies the
weights (timm's ``get_decay`` is 0 there), and ``update_after_step`` more steps copy too.

What reads the average:

- validation: the EMA weights are swapped into the model for the epoch and swapped back before
  anything saves (``on_validation_epoch_end`` comes before ModelCheckpoint's
  ``on_validation_end`` / ``on_train_epoch_end``), so val metrics, the objective ModelCheckpoint
  keeps the best of, plateau stages and Optuna pruning all judge the EMA;
- every checkpoint keeps both: ``state_dict`` holds the raw weights (an exact resume continues
  training them) and ``ema_state_dict`` the average, which a resume restores;
- testing loads the tested checkpoint's EMA into the model and leaves it there, so the shifted
  test splits and retention that follow measure the same weights the test did;
- a trained model read back (eval, export, the registry, predict/serve, ``init_from``) is read
  through ``trained.model_state``, which prefers ``ema_state_dict``.

Under DDP every rank holds the same weights after every step (DDP all-reduces the gradients and
each rank takes the same optimizer step), so each rank's average is the same without any sync.

At a stage change nothing is reset: a frozen group's average equals its weights exactly (the
lerp of a value with itself is that value), so when the group starts to train its average starts
where the optimizer does, and the head's average carries over. The decay keeps following the
run's optimizer step; ``module.stage_rewarmup`` has no counterpart here.

With cached backbone features (engine/feature_cache.py) only the head trains, and the frozen
backbone's average is the backbone itself, so the cached validation features are the EMA
model's features too, provided the backbone never trained before the cached epochs (checked at
fit start).
"""

from __future__ import annotations

import logging
from typing import Annotated

import lightning as L
import torch
from timm.utils import ModelEmaV3

from tunelab.config.settings import BOOL, POSITIVE, checked, integer, number
from tunelab.engine.feature_cache import FeatureCache
from tunelab.engine.trained import EMA_WEIGHTS
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)


class WeightEMA(L.Callback):
    """The EMA of ``pl_module.model``: updated after each optimizer step, validated and tested."""

    @checked("callbacks.ema")
    def __init__(self, decay: Annotated[float, number(0, 1)] = 0.999, warmup: Annotated[bool, BOOL] = True,
                 warmup_power: Annotated[float, POSITIVE] = 0.75, warmup_gamma: Annotated[float, POSITIVE] = 1.0,
                 update_after_step: Annotated[int, integer(0)] = 0):
        self.settings = {"decay": float(decay), "use_warmup": bool(warmup), "warmup_power": float(warmup_power),
                         "warmup_gamma": float(warmup_gamma), "update_after_step": int(update_after_step)}
        self.ema: ModelEmaV3 | None = None
        self.loaded: dict | None = None  # the EMA weights of the checkpoint Lightning just restored
        self.updated_at = -1  # the optimizer step the average last took in
        self.swapped = False  # the model holds the EMA weights (and the EMA copy the raw ones)

    # -- fit ----------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "save_weights_only", False):  # Lightning skips callbacks' state then
                raise TunelabError("callbacks.ema needs full checkpoints, but a ModelCheckpoint has "
                                   "save_weights_only=true: its files would hold no EMA weights.")

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        _check_cache(trainer)
        # a copy on the model's device (strategy.setup has moved it there), never trained itself
        self.ema = ModelEmaV3(pl_module.model, **self.settings)
        self.ema.module.requires_grad_(False)
        if self.loaded is not None:  # a resume: the average continues exactly
            _copy_into(self.ema.module, self.loaded)
        elif trainer.ckpt_path:
            log.info("ema: %s holds no EMA weights; the average starts from its weights", trainer.ckpt_path)
        self.loaded, self.updated_at, self.swapped = None, trainer.global_step, False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step != self.updated_at:  # an optimizer step happened (gradient accumulation)
            self.ema.update(pl_module.model, step=trainer.global_step)
            self.updated_at = trainer.global_step

    # -- validation and test --------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self._swap(pl_module)
        else:  # trainer.validate(ckpt_path=...): a trained model's EMA, like testing
            self._use_ema(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.swapped:  # before ModelCheckpoint saves and before plateau stages copy the weights
            self._swap(pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        self._use_ema(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if self.swapped:  # SIGTERM mid-validation: the pre-emption checkpoint must hold the raw weights
            self._swap(pl_module)

    # -- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        if self.ema is not None:  # keys as in state_dict, so readers overlay one on the other
            checkpoint[EMA_WEIGHTS] = {f"model.{k}": v for k, v in self.ema.module.state_dict().items()}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        self.loaded = checkpoint.get(EMA_WEIGHTS)

    # -- helpers ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _swap(self, pl_module) -> None:
        """Exchange the model's weights and the average's, in place (its own inverse)."""
        if self.ema is None:
            return
        for raw, avg in zip(pl_module.model.state_dict().values(), self.ema.module.state_dict().values()):
            kept = raw.clone()
            raw.copy_(avg)
            avg.copy_(kept)
        self.swapped = not self.swapped

    def _use_ema(self, trainer: L.Trainer, pl_module) -> None:
        """Outside fit: the restored checkpoint's EMA, else (no checkpoint) the live average."""
        if trainer.ckpt_path:
            if self.loaded is None:
                raise TunelabError(f"ema: {trainer.ckpt_path} holds no EMA weights (it was not written by a run "
                                   "with ema=default); test it without callbacks.ema.")
            _copy_into(pl_module.model, self.loaded)
            self.loaded = None
        elif self.ema is not None:
            _copy_into(pl_module.model, {f"model.{k}": v for k, v in self.ema.module.state_dict().items()})


@torch.no_grad()
def _copy_into(model: torch.nn.Module, weights: dict) -> None:
    """``weights`` (state_dict keys, ``model.`` prefixed) into ``model``, on its device."""
    model.load_state_dict({k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")})


def _check_cache(trainer: L.Trainer) -> None:
    """Cached validation features come from the raw backbone; they are the EMA model's only if the
    backbone never trained before the cached epochs (the average of an untouched value is itself)."""
    cache = next((c for c in trainer.callbacks if isinstance(c, FeatureCache)), None)
    epochs = cache.plan.epochs if cache is not None else None
    if epochs is not None and epochs.start > 0:
        raise TunelabError(f"callbacks.ema with the feature cache on for epochs {epochs.start}-{epochs.stop - 1}: "
                           "an earlier stage trains the backbone, so the cached validation features would not "
                           "be the EMA model's; set perf.cache_features=false.")
