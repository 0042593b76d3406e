"""How BatchNorm layers behave while a model trains (``module.batchnorm``).

    eval:        every layer always uses (and keeps) its running statistics: the Keras
                 fine-tuning recipe, for small batches or data far from the pretraining set.
    frozen_eval: layers whose parameters are frozen use their running statistics (and never
                 update them); trainable layers normalise with batch statistics.
    train:       plain PyTorch behaviour; frozen layers' statistics drift too.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tunelab.errors import TunelabError

BATCHNORM_MODES = ("eval", "frozen_eval", "train")


def check_mode(mode: str) -> str:
    if mode not in BATCHNORM_MODES:
        raise TunelabError(f"module.batchnorm must be one of auto, {', '.join(BATCHNORM_MODES)}, got {mode!r}.")
    return mode


def hold_running_stats(model: nn.Module, mode: str) -> None:
    """After ``model.train()``: put the BatchNorm layers that ``mode`` keeps on running statistics in eval mode."""
    if mode == "train":
        return
    for m in model.modules():
        if isinstance(m, _BatchNorm) and (mode == "eval" or m.weight is None or not m.weight.requires_grad):
            m.eval()
