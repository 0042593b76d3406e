"""Mixup / CutMix of training batches (the ``mixup`` group), on timm's ``Mixup``.

timm mixes a batch with itself reversed and returns soft targets; the loss then takes class
probabilities (cross-entropy does, so ``loss.label_smoothing`` smooths the mixed targets exactly
as timm's own smoothing would). Two things are tunelab's:

- timm draws λ and the CutMix box from NumPy's global generator, which no checkpoint holds; each
  batch here draws from a generator seeded by (seed, optimizer step, rank), so a resumed run
  mixes exactly as the uninterrupted one did, and DDP ranks mix differently;
- timm refuses odd batches; the last sample of an odd batch (a short last batch) stays unmixed.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import one_hot

from tunelab.config.settings import FRACTION, checked, choice, number
from tunelab.data.sampling import sample_seed
from tunelab.errors import TunelabError

ALPHA = number(0)


class BatchMixer:
    """Mixes ``(images, class indices)`` into ``(mixed images, class probabilities)``; multi-label
    0/1 targets are mixed the same way (timm's ``multi_label``)."""

    @checked("mixup")
    def __init__(self, num_outputs: int, task: str, modality: str, seed: int = 0,
                 mixup_alpha: Annotated[float, ALPHA] = 0.8, cutmix_alpha: Annotated[float, ALPHA] = 1.0,
                 prob: Annotated[float, number(0, 1)] = 1.0, switch_prob: Annotated[float, FRACTION] = 0.5,
                 mode: Annotated[str, choice("batch", "pair", "elem")] = "batch"):
        if task not in ("classification", "multilabel") or modality != "image":
            what = f"{modality} inputs" if modality != "image" else f"data.task={task}"
            raise TunelabError(f"mixup=... mixes images and their labels; it cannot apply to {what}. "
                               "Remove it (mixup=none).")
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise TunelabError("mixup.mixup_alpha and mixup.cutmix_alpha are both 0: nothing would be mixed; "
                               "use mixup=none instead.")
        self.num_classes, self.seed, self.multilabel = num_outputs, seed, task == "multilabel"
        self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                           mode=mode, label_smoothing=0.0, num_classes=num_outputs, multi_label=self.multilabel)

    def describe(self) -> str:
        m = self.mixup
        return (f"mixup: mixup_alpha {m.mixup_alpha}, cutmix_alpha {m.cutmix_alpha}, prob {m.mix_prob}, "
                f"switch_prob {m.switch_prob}, mode {m.mode}")

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        even = len(x) - len(x) % 2
        soft = y.to(x.dtype) if self.multilabel else one_hot(y, self.num_classes).to(x.dtype)
        if even < 2:
            return x, soft
        state = np.random.get_state()  # timm draws from the global NumPy stream: borrow it, seeded
        try:
            np.random.seed(sample_seed(self.seed, step, rank) % 2**32)
            x = x.clone()  # timm mixes in place; the loader's batch stays as it was
            x[:even], soft[:even] = self.mixup(x[:even], y[:even])
        finally:
            np.random.set_state(state)
        return x, soft
