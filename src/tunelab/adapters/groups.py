"""The contract every adapter fulfils: a model plus its parameters split into ordered groups.

Everything downstream (strategies, optimizer, stage callback) speaks only of these groups,
so a strategy never needs to know which architecture it is freezing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from tunelab.errors import TunelabError


@dataclass(frozen=True)
class LayerGroup:
    name: str
    param_names: tuple[str, ...]


@dataclass
class Adapter:
    model: nn.Module
    groups: list[LayerGroup]  # input -> output; the new task head is last and named "head"
    data_config: dict = field(default_factory=dict)  # what the data needs: normalisation, tokenizer...
    description: str = ""
    modality: str = "image"  # image, text or audio: which DataModules can feed it
    frozen_groups: tuple[str, ...] = ()  # groups no stage ever trains (e.g. a speech feature encoder)
    # The pretrained model's own head when the new head replaced it (e.g. ImageNet's 1000
    # classes): retention measures how well the fine-tuned backbone still serves it.
    pretrained_head: object = None
    pretrained_task: str | None = None  # imagenet, sentence_similarity: what retention checks
    # The model split at the head's input, for the cached-feature fast path (perf.py):
    # features(model, inputs) -> what the head reads (before any head-side dropout);
    # classify(model, features) -> outputs, with the head-side dropout in training mode.
    # classify(features(x)) must equal model(x) in eval mode. None: this model is never cached.
    features: Callable | None = None
    classify: Callable | None = None
    head_side: tuple[str, ...] = ()  # modules that run after the features (their dropout is expected)
    # checkpointing(model) turns on activation checkpointing (perf.activation_checkpointing):
    # blocks keep only their inputs and recompute the rest in the backward pass. None: it cannot.
    checkpointing: Callable[[nn.Module], None] | None = None

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.groups]

    def enable_activation_checkpointing(self) -> None:
        if self.checkpointing is None:
            raise TunelabError(f"perf.activation_checkpointing=true but {self.description or type(self.model).__name__} "
                               "has no activation checkpointing; set perf.activation_checkpointing=false.")
        self.checkpointing(self.model)


def name_groups(param_groups: list[list[str]]) -> list[str]:
    """Readable names for groups of parameter names, e.g. ``conv_stem+bn1`` or ``blocks.3``.

    A group is named by the shortest module prefixes that no other group shares, so names
    stay stable across architectures and say which modules a group holds.
    """
    owners: dict[str, set[int]] = defaultdict(set)
    for gi, names in enumerate(param_groups):
        for name in names:
            parts = name.split(".")[:-1] or [name]
            for k in range(1, len(parts) + 1):
                owners[".".join(parts[:k])].add(gi)
    result = []
    for gi, names in enumerate(param_groups):
        roots: list[str] = []
        for name in names:
            parts = name.split(".")[:-1] or [name]
            prefixes = (".".join(parts[:k]) for k in range(1, len(parts) + 1))
            root = next((p for p in prefixes if owners[p] == {gi}), ".".join(parts))
            if root not in roots:
                roots.append(root)
        result.append("+".join(roots))
    return result


def head_last(backbone: list[list[str]], head: list[str]) -> list[LayerGroup]:
    """Backbone groups in the order given, then the new task head, named ``head``.

    Names are chosen with the head among the groups, so a module the head shares a prefix
    with gets a distinct name (ConvNeXt's ``head.norm`` beside the new ``head.fc``), and
    every name is unique: strategies, LR multipliers and ``lr/<group>`` metrics key on them.
    """
    backbone = [names for names in backbone if names]
    named = name_groups([*backbone, head])[:-1]
    taken, groups = {"head"}, []
    for name, names in zip(named, backbone):
        name = "pre_head" if name == "head" else name  # e.g. SelecSLS's conv `head` before its `fc`
        unique, k = name, 2
        while unique in taken:
            unique, k = f"{name}_{k}", k + 1
        taken.add(unique)
        groups.append(LayerGroup(unique, tuple(names)))
    return [*groups, LayerGroup("head", tuple(head))]


def init_head(head: nn.Module, std: float) -> None:
    """A new head starts near zero, so the first logits are near uniform.

    timm's own inits scale with 1/sqrt(fan_out): for a 10-class head on 1280 features that
    gives logits of several units and an initial loss near 9 instead of ln(10) = 2.3, whose
    large gradients then wreck the pretrained features as soon as they are unfrozen.
    """
    for m in head.modules():  # 1x1 convolutions are the classifier of DLA, DPN and ResNetV2
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
