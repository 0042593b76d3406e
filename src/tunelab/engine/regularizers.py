"""Regularizers added to the task loss; each is a module so its references follow the device."""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from tunelab.config.settings import checked, number


class L2SP(nn.Module):
    """L2-SP (Li et al. 2018): ``alpha/2 ‖w − w_pretrained‖²`` on the backbone, ``beta/2 ‖w‖²``
    on the new head, over the parameters that currently train.

    The pretrained reference is a copy taken when the run is built; it is not saved in
    checkpoints (non-persistent buffers) because rebuilding the run reloads the same weights.
    """

    @checked("regularizer")
    def __init__(self, model: nn.Module, head_names: set[str], alpha: Annotated[float, number(0)] = 0.01,
                 beta: Annotated[float, number(0)] = 0.01):
        super().__init__()
        self.alpha, self.beta = alpha, beta
        named = list(model.named_parameters())
        self.head = [n in head_names for n, _ in named]
        for i, (n, p) in enumerate(named):
            if n not in head_names:
                self.register_buffer(f"ref{i}", p.detach().clone(), persistent=False)

    def forward(self, model: nn.Module) -> torch.Tensor:
        total = torch.zeros((), device=next(model.parameters()).device)
        for i, (p, is_head) in enumerate(zip(model.parameters(), self.head)):
            if not p.requires_grad:
                continue  # frozen weights equal their reference: no penalty, no work
            if is_head:
                total = total + 0.5 * self.beta * p.pow(2).sum()
            else:
                total = total + 0.5 * self.alpha * (p - getattr(self, f"ref{i}")).pow(2).sum()
        return total
