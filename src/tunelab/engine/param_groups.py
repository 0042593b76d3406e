"""The optimizer's fixed layout: one param group per layer group (split into decay / no-decay),
each with a discriminative LR scale, and the optimizer settings tunelab relies on."""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from tunelab.adapters import LayerGroup
from tunelab.config.settings import BOOL, POSITIVE, expect, number, reads
from tunelab.errors import TunelabError

LAYER_DECAY = number(0, 1, low_open=True)


def _no_decay(name: str, param: torch.Tensor) -> bool:
    # Biases and norm scales/shifts (all 1-D) are not pulled toward zero: decaying them
    # only hurts, and for a frozen-then-unfrozen norm layer it would be pure drift.
    return param.ndim <= 1 or name.endswith(".bias")


def layer_scales(groups: list[str], layer_decay: float = 1.0, group_lr_mults: dict | None = None) -> dict[str, float]:
    """Discriminative LRs: ``layer_decay ** depth`` (head depth 0, the group below it 1, ...)
    times any explicit per-group multiplier. Independent of the strategy."""
    mults = dict(group_lr_mults or {})
    unknown = set(mults) - set(groups)
    if unknown:
        raise TunelabError(f"module.group_lr_mults names unknown layer groups {sorted(unknown)}; this model has {groups}.")
    expect(layer_decay, LAYER_DECAY, "module.layer_decay")
    depth = {g: len(groups) - 1 - i for i, g in enumerate(groups)}
    return {g: layer_decay ** depth[g] * float(mults.get(g, 1.0)) for g in groups}


@reads("optimizer", closed=False)  # the optimizer's own signature checks its keys
def optimizer_settings(
    lr: Annotated[float, POSITIVE],
    weight_decay: Annotated[float, number(0)] = 0.0,
    momentum: Annotated[float, number(0, 1, high_open=True)] = 0.0,
    nesterov: Annotated[bool, BOOL] = False,
) -> None:
    """The optimizer settings tunelab relies on: ``lr`` is the base every layer group's LR scales
    (torch accepts lr=0, which would train nothing)."""


def param_groups(model: nn.Module, groups: list[LayerGroup]) -> list[dict]:
    """Every layer group's parameters from step 0, tagged ``layer_group``: a stage change flips
    ``requires_grad`` and the LR multiplier, never the groups, so checkpoints and DDP see one layout."""
    named = dict(model.named_parameters())
    found = []
    for g in groups:
        decay = [named[n] for n in g.param_names if not _no_decay(n, named[n])]
        plain = [named[n] for n in g.param_names if _no_decay(n, named[n])]
        if decay:
            found.append({"params": decay, "layer_group": g.name})
        if plain:
            found.append({"params": plain, "layer_group": g.name, "weight_decay": 0.0})
    return found
