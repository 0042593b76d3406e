"""Speed and memory options (``perf`` in conf/train.yaml): torch.compile recompiled at every stage
change, channels_last, fused optimizers, activation checkpointing. docs/performance.md has the
measurements behind each default.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Annotated

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tunelab.config.settings import BOOL, choice, reads, text
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)
FUSED_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@reads("perf", noun="perf")
def perf_settings(
    cache_features: Annotated[bool | str, choice("auto", True, False)] = "auto",
    compile: Annotated[bool, BOOL] = False,
    compile_mode: Annotated[str | None, text(null=True)] = None,
    compile_backend: Annotated[str, text()] = "inductor",
    channels_last: Annotated[bool, BOOL] = True,
    fused_optimizer: Annotated[bool | str, choice("auto", True, False)] = "auto",
    activation_checkpointing: Annotated[bool, BOOL] = False,
) -> dict:
    """The ``perf`` settings (conf/train.yaml), as the module and the feature cache read them."""
    return {"cache_features": cache_features, "compile": compile, "compile_mode": compile_mode,
            "compile_backend": compile_backend, "channels_last": channels_last, "fused_optimizer": fused_optimizer,
            "activation_checkpointing": activation_checkpointing}


def compile_options(perf: dict | None) -> dict | None:
    """``torch.compile`` keyword arguments, or None when compilation is off."""
    perf = dict(perf or {})
    if not perf.get("compile"):
        return None
    mode = perf.get("compile_mode")
    if mode not in COMPILE_MODES:
        raise TunelabError(f"perf.compile_mode must be one of {', '.join(map(str, COMPILE_MODES))}, got {mode!r}.")
    backend = str(perf.get("compile_backend") or "inductor")
    backends = torch._dynamo.list_backends(exclude_tags=())  # debug backends (aot_eager) included
    if backend not in backends:
        raise TunelabError(f"perf.compile_backend={backend!r} is not a torch.compile backend; "
                           f"available: {', '.join(backends)}.")
    return {"backend": backend, **({"mode": mode} if mode else {})}


def compile_model(model: nn.Module, options: dict) -> nn.Module:
    """A freshly compiled view of ``model`` for its current trainable set.

    Graphs compiled before a freeze keep computing the frozen layers' gradients (the backward
    graph is fixed at trace time), so the freeze would save nothing. Resetting dynamo's caches
    and compiling again lets AOTAutograd drop the frozen weights' backward.
    """
    torch.compiler.reset()
    return torch.compile(model, **options)


def checkpoint_activations(adapter, batchnorm: str) -> None:
    """perf.activation_checkpointing: the adapter's model keeps only each block's input in the
    forward pass and recomputes the block in the backward pass (less memory, one more forward).

    Refused where the recomputation would change training: a BatchNorm layer normalising with
    batch statistics updates its running statistics in the recomputed forward too, twice a step.
    Dropout and drop-path are safe: the recomputation replays the forward's random state.
    """
    if batchnorm != "eval" and any(isinstance(m, _BatchNorm) for m in adapter.model.modules()):
        raise TunelabError(f"perf.activation_checkpointing=true with module.batchnorm={batchnorm} would update the "
                           "BatchNorm running statistics twice per step (once more when a block is recomputed); "
                           "set module.batchnorm=eval or perf.activation_checkpointing=false.")
    adapter.enable_activation_checkpointing()


def to_channels_last(x):
    """Image batches (N, C, H, W) in NHWC layout; anything else unchanged."""
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def fused_kwargs(factory, setting, device: torch.device) -> dict:
    """``{"fused": True}`` when the optimizer has a fused kernel and the setting asks for it.

    ``auto`` fuses on CPU and CUDA: on CPU the fused AdamW step measured 2.0 ms against 7.8 ms
    for the default foreach one (EfficientNet-Lite0, 3.4 M parameters; docs/performance.md).
    """
    if setting not in ("auto", True, False):
        raise TunelabError(f"perf.fused_optimizer must be auto, true or false, got {setting!r}.")
    func = factory.func if isinstance(factory, functools.partial) else factory
    keywords = factory.keywords if isinstance(factory, functools.partial) else {}
    if setting is False or "fused" in keywords or "foreach" in keywords:
        return {}
    fusable = isinstance(func, type) and issubclass(func, FUSED_OPTIMIZERS)
    if setting is True and not fusable:
        raise TunelabError(f"perf.fused_optimizer=true but {getattr(func, '__name__', func)} has no fused kernel "
                           f"(fused: {', '.join(o.__name__ for o in FUSED_OPTIMIZERS)}).")
    if fusable and (setting is True or device.type in ("cuda", "cpu")):
        return {"fused": True}
    return {}


class EpochThroughput(Callback):
    """Logs ``perf/train_samples_per_s`` per epoch: training samples over the wall time of the
    epoch's training batches, data loading included and validation excluded, summed over DDP
    ranks. Beside the loader's own rate it says whether loading or compute bounds a run."""

    def __init__(self):
        self._restart(None)

    def _restart(self, started: float | None) -> None:
        self.samples, self.started, self.seconds = 0, started, None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._restart(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.started is None:  # a resumed epoch (Lightning calls no on_train_epoch_start): from here
            self._restart(time.perf_counter())
            return
        self.samples += len(batch[1])

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stop()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop()
        if self.samples and self.seconds:
            pl_module.log("perf/train_samples_per_s", self.samples / self.seconds, on_epoch=True,
                          reduce_fx="sum", sync_dist=True)
        self.started = None

    def _stop(self) -> None:
        if self.started is not None and self.seconds is None:  # validation or the epoch's end, whichever first
            if torch.cuda.is_initialized():  # queued kernels belong to this epoch's time
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.started
