"""timm models as tunelab adapters: any timm architecture, a new head, named layer groups."""

from __future__ import annotations

import difflib
import functools
from typing import Annotated

import timm
import timm.data
from timm.layers import set_reentrant_ckpt
from timm.models import get_pretrained_cfg, group_parameters
import torch.nn.functional as F
from torch import nn

from tunelab.adapters.groups import Adapter, LayerGroup, head_last, init_head
from tunelab.adapters.lora import inject_lora
from tunelab.adapters.weights import SHIPPED_WEIGHTS, load_into, read_state_dict
from tunelab.config.settings import BOOL, FRACTION, POSITIVE, checked, mapping, number
from tunelab.errors import TunelabError


@checked("model")
def timm_adapter(
    arch: str,
    num_outputs: int,
    pretrained: Annotated[bool, BOOL] = True,
    checkpoint: str | None = None,
    fine_groups: Annotated[bool, BOOL] = False,
    drop_rate: Annotated[float, FRACTION] = 0.0,
    drop_path_rate: Annotated[float | None, number(0, 1, high_open=True, null=True)] = None,
    kwargs: Annotated[dict | None, mapping()] = None,
    image_size: int | None = None,
    head_init_std: Annotated[float, POSITIVE] = 0.01,
    lora: dict | None = None,
    lora_targets: list[str] | None = None,
) -> Adapter:
    """Build ``arch`` with a ``num_outputs`` head (classes, or 1 for regression) and load local pretrained weights.

    Weights come from ``checkpoint`` when given, else from a package that ships them
    (``SHIPPED_WEIGHTS``); ``pretrained=False`` without a checkpoint means random init.
    ``image_size`` (the data's) is passed on to architectures with a fixed input size.
    ``lora`` (``target_modules``, ``r``, ``alpha``, ``dropout``) injects LoRA adapters after
    the pretrained weights are loaded; ``target_modules`` defaults to ``lora_targets``.
    """
    model = _create(arch, num_outputs, drop_rate, drop_path_rate, kwargs, image_size)
    layers = classifier_layers(model, arch)
    head_names = _param_names(model, layers)
    weights, source = _pretrained_weights(arch, model, head_names, checkpoint, pretrained)
    head_kept = load_into(model, weights, head_names, source) if weights is not None else False
    original_head = _original_head(weights, model, layers) if weights is not None and not head_kept else None
    if not head_kept:
        for layer in layers.values():
            init_head(layer, head_init_std)
    head = "pretrained head kept" if head_kept else f"new {num_outputs}-output head"
    if lora:
        added = inject_lora(model, **lora, default_targets=lora_targets)
        # peft wraps layers in place: the same module names, new parameter names under them
        layers = {name: model.get_submodule(name) for name in layers}
        head_names = _param_names(model, layers)
        head += f", LoRA +{added:,} params"
    groups = timm_groups(model, head_names, fine=fine_groups)
    return Adapter(
        model=model,
        groups=groups,
        data_config=timm.data.resolve_data_config({}, model=model),
        description=f"timm {arch} ({source}, {head}, {len(groups)} layer groups)",
        pretrained_head=original_head,
        pretrained_task="imagenet" if original_head is not None and original_head.out_features == 1000 else None,
        checkpointing=functools.partial(checkpoint_blocks, arch=arch),
        **_feature_split(model, layers),
    )


def checkpoint_blocks(model: nn.Module, arch: str) -> None:
    """timm's own activation checkpointing (``checkpoint_seq`` over the blocks or stages).

    Non-reentrant, whatever ``TIMM_REENTRANT_CKPT`` says: reentrant checkpointing gives the
    blocks no gradient when their input needs none (a frozen stem below trainable blocks)."""
    set_reentrant_ckpt(False)
    try:
        model.set_grad_checkpointing(True)
    except (AssertionError, NotImplementedError, AttributeError):  # e.g. DLA, Inception: "not supported"
        raise TunelabError(f"perf.activation_checkpointing=true but timm {arch} has no activation checkpointing; "
                           "set perf.activation_checkpointing=false.") from None


def _create(arch: str, num_outputs: int, drop_rate: float, drop_path_rate: float | None, kwargs: dict | None,
            image_size: int | None) -> nn.Module:
    """The architecture with a ``num_outputs`` classifier and random weights."""
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " See timm.list_models()."
        raise TunelabError(f"model.arch={arch!r} is not a timm architecture.{hint}")
    if num_outputs < 1:
        raise TunelabError(f"the new head needs num_outputs >= 1, got {num_outputs}.")
    # 0 is every timm classifier's default, and feature encoders (*_enc) take no drop_rate at all
    extra = {"drop_rate": drop_rate} if drop_rate else {}
    if drop_path_rate is not None:
        extra["drop_path_rate"] = drop_path_rate
    pretrained_cfg = get_pretrained_cfg(arch)
    if image_size and pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        extra["img_size"] = image_size  # ViT-like models bake the input size into their weights
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_outputs, **extra, **(kwargs or {}))
    except TypeError as err:
        settings = "model.kwargs" if kwargs else "model.drop_rate / drop_path_rate / image_size"
        raise TunelabError(f"{settings} for {arch} rejected by timm: {err}") from None


def _pretrained_weights(arch: str, model: nn.Module, head_names: set[str], checkpoint: str | None,
                        pretrained: bool) -> tuple[dict | None, str]:
    """(state dict, where it came from): ``checkpoint``, else weights a package ships, else none."""
    if checkpoint:
        return read_state_dict(checkpoint), str(checkpoint)
    if not pretrained:
        return None, "random init"
    if arch not in SHIPPED_WEIGHTS:
        raise TunelabError(
            f"model.pretrained=true but no local weights exist for {arch!r} (tunelab never downloads "
            f"from a hub; shipped: {', '.join(SHIPPED_WEIGHTS)}). Set model.checkpoint=/path/to/weights.pth, "
            "or model.pretrained=false to start from random init."
        )
    return SHIPPED_WEIGHTS[arch](model, head_names), f"shipped {arch} weights"


def _timm_features(model: nn.Module, x):
    """What the classifier reads, taken at its input: exact whatever sits between the pooling
    and it (ConvNeXt's ``head.norm``, EfficientViT's BatchNorm), which ``pre_logits`` may skip.
    The caller runs this in eval mode, so the head dropout applied in training is off."""
    captured = []
    hook = model.get_classifier().register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        model(x)
    finally:
        hook.remove()
    if len(captured) != 1:
        raise TunelabError(f"feature cache: {type(model).__name__} ran its classifier {len(captured)} times in one "
                           "forward pass, so its input is no single feature vector; set perf.cache_features=false.")
    return captured[0]


def _feature_split(model: nn.Module, layers: dict[str, nn.Module]) -> dict:
    """``features`` / ``classify`` for the cached-feature path, where the head's dropout is known:
    CNNs apply ``F.dropout(drop_rate)`` before the classifier, ViTs a ``head_drop`` module.

    Only where ``get_classifier()`` is one module that holds every new classifier layer: a
    distilled model's pair of heads, or VOLO's ``aux_head`` reading the patch tokens, are not
    a function of what one classifier reads."""
    if not _classifier_reads_features(model, layers):
        return {}
    if isinstance(getattr(model, "head_drop", None), nn.Dropout):
        p, side = model.head_drop.p, ("head_drop",)
    elif isinstance(getattr(model, "drop_rate", None), (int, float)):
        p, side = float(model.drop_rate), ()
    else:
        return {}

    def classify(model: nn.Module, features):
        # flatten: a 1x1-convolution classifier (DLA, ResNetV2) answers [B, C, 1, 1]
        return model.get_classifier()(F.dropout(features, p=p, training=model.training)).flatten(1)

    return {"features": _timm_features, "classify": classify, "head_side": side}


def _original_head(weights: dict, model: nn.Module, layers: dict[str, nn.Module]) -> nn.Linear | None:
    """The checkpoint's own linear classifier (weight + bias), kept aside when a new head replaced it.

    Only for a model whose whole classifier is that one linear layer on the pooled features
    (what retention feeds it); a pair of distilled heads or a normed head would be misread."""
    plain = len(layers) == 1 and isinstance(model.get_classifier(), nn.Linear)
    if not plain or not _classifier_reads_features(model, layers):
        return None
    (name,) = layers
    weight, bias = weights.get(f"{name}.weight"), weights.get(f"{name}.bias")
    if weight is None or weight.dim() != 2:
        return None
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    head.load_state_dict({"weight": weight, **({"bias": bias} if bias is not None else {})})
    return head.eval().requires_grad_(False)


def classifier_layers(model: nn.Module, arch: str) -> dict[str, nn.Module]:
    """The layers timm builds for ``num_classes``, by module name: the new task head.

    timm declares them in the pretrained config (``classifier``: the keys it never loads from a
    checkpoint with another class count), which excludes what merely sits in front of the
    logits and keeps its pretrained weights (ConvNeXt's ``head.norm``, LeViT's ``head.bn``) and
    includes extra class outputs (VOLO's ``aux_head``, distilled models' ``head_dist``).
    ``get_classifier()`` (a module or a tuple) adds any classifier the config forgot, taking from
    it the part the config names in its siblings (levit_384_s8 declares ``head.linear`` only:
    ``head_dist.linear`` joins, ``head_dist.bn`` does not).
    """
    modules = dict(model.named_modules())
    declared = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    declared = (declared,) if isinstance(declared, str) else declared
    layers = {n: modules[n] for n in declared if n in modules}
    found = model.get_classifier() if hasattr(model, "get_classifier") else None
    by_id = {id(m): n for n, m in modules.items()}
    named = [by_id[id(m)] for m in (found if isinstance(found, (tuple, list)) else (found,))
             if isinstance(m, nn.Module) and id(m) in by_id]
    inner = {n[len(c) + 1:] for c in named for n in layers if n.startswith(c + ".")}
    for name in named:
        if not _overlaps(modules[name], layers.values()):
            parts = [f"{name}.{part}" for part in inner if f"{name}.{part}" in modules] or [name]
            layers.update({n: modules[n] for n in parts})
    layers = {n: m for n, m in layers.items() if any(True for _ in m.parameters())}
    if not layers:
        why = "its classifier has no parameters" if found is not None else "it has no classifier (get_classifier())"
        raise TunelabError(f"model.arch={arch!r} cannot be split into backbone and a new head: {why}, so there "
                           "is no layer for num_outputs to replace (a feature encoder?); choose a classification "
                           "variant.")
    return layers


def _overlaps(module: nn.Module, others) -> bool:
    ids = {id(p) for p in module.parameters()}
    return any(id(p) in ids for other in others for p in other.parameters())


def _classifier_reads_features(model: nn.Module, layers: dict[str, nn.Module]) -> bool:
    """Whether ``get_classifier()`` is one module containing every new classifier layer."""
    found = model.get_classifier()
    if not isinstance(found, nn.Module) or type(found).forward is nn.Module.forward:
        return False  # a tuple (distilled models) or a ModuleList (CrossViT): nothing to call
    inside = {id(p) for p in found.parameters()}
    return all(id(p) in inside for layer in layers.values() for p in layer.parameters())


def _param_names(model: nn.Module, layers: dict[str, nn.Module]) -> set[str]:
    ids = {id(p) for layer in layers.values() for p in layer.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def timm_groups(model: nn.Module, head_names: set[str], fine: bool = False) -> list[LayerGroup]:
    """timm's own ``group_matcher`` order (stem, blocks..., final), with the new head split out last."""
    by_id = group_parameters(model, _matcher(model, fine))
    ordered = [[n for n in names if n not in head_names] for _, names in sorted(by_id.items())]
    ordered = _stem_leftovers([names for names in ordered if names], model)
    order = [n for n, _ in model.named_parameters()]
    return head_last(ordered, [n for n in order if n in head_names])


def _stem_leftovers(ordered: list[list[str]], model: nn.Module) -> list[list[str]]:
    """timm sends what its matcher does not name to the top group; of that, a module registered
    before the blocks runs before them (vit_srelpos's ``shared_rel_pos``) and joins the stem."""
    if len(ordered) < 3:
        return ordered
    rank = {name: i for i, (name, _) in enumerate(model.named_children())}
    blocks = rank.get(ordered[1][0].split(".")[0], -1)  # the first group after the stem
    early = [n for n in ordered[-1] if "." in n and rank.get(n.split(".")[0], blocks) < blocks]
    if not early:
        return ordered
    top = [n for n in ordered[-1] if n not in early]
    return [ordered[0] + early, *ordered[1:-1], *([top] if top else [])]


def _matcher(model: nn.Module, fine: bool):
    if not hasattr(model, "group_matcher"):
        return _child_order(model)
    try:
        return model.group_matcher(coarse=not fine)
    except (AssertionError, NotImplementedError):  # RDNet only groups finely (per block)
        return model.group_matcher(coarse=False)


def _child_order(model: nn.Module):
    """A matcher for models without ``group_matcher`` (PiT, MetaFormer...): timm registers
    children from input to output, so each top-level child is a group, and each item of a
    top-level Sequential / ModuleList (the stages) one of its own; root parameters such as
    ``cls_token`` and ``pos_embed`` go with the stem."""
    children = list(model.named_children())
    position = {name: i for i, (name, _) in enumerate(children)}
    containers = {name for name, m in children if isinstance(m, (nn.Sequential, nn.ModuleList))}

    def ordinal(param_name: str) -> tuple[int, int]:
        parts = param_name.split(".")
        if len(parts) == 1:
            return (0, 0)
        item = parts[1] if parts[0] in containers and parts[1].isdigit() else "0"
        return (position[parts[0]], int(item))

    return ordinal
