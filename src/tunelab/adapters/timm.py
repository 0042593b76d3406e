"""timm models as tunelab adapters: any timm architecture, a new head, named layer groups."""

from __future__ import annotations

import difflib

import timm
import timm.data
from timm.models import get_pretrained_cfg, group_parameters
import torch.nn.functional as F
from torch import nn

from tunelab.adapters.groups import Adapter, LayerGroup, init_head, name_groups
from tunelab.adapters.lora import inject_lora
from tunelab.adapters.weights import SHIPPED_WEIGHTS, load_into, read_state_dict
from tunelab.errors import TunelabError


def timm_adapter(
    arch: str,
    num_outputs: int,
    pretrained: bool = True,
    checkpoint: str | None = None,
    fine_groups: bool = False,
    drop_rate: float = 0.0,
    drop_path_rate: float | None = None,
    kwargs: dict | None = None,
    image_size: int | None = None,
    head_init_std: float = 0.01,
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
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " See timm.list_models()."
        raise TunelabError(f"model.arch={arch!r} is not a timm architecture.{hint}")
    if num_outputs < 1:
        raise TunelabError(f"the new head needs num_outputs >= 1, got {num_outputs}.")
    extra = {"drop_path_rate": drop_path_rate} if drop_path_rate is not None else {}
    pretrained_cfg = get_pretrained_cfg(arch)
    if image_size and pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        extra["img_size"] = image_size  # ViT-like models bake the input size into their weights
    try:
        model = timm.create_model(
            arch, pretrained=False, num_classes=num_outputs, drop_rate=drop_rate, **extra, **(kwargs or {})
        )
    except TypeError as err:
        raise TunelabError(f"model.kwargs for {arch} rejected by timm: {err}") from None
    head_names = _head_param_names(model)

    if checkpoint:
        weights, source = read_state_dict(checkpoint), str(checkpoint)
    elif pretrained:
        if arch not in SHIPPED_WEIGHTS:
            raise TunelabError(
                f"model.pretrained=true but no local weights exist for {arch!r} (tunelab never downloads "
                f"from a hub; shipped: {', '.join(SHIPPED_WEIGHTS)}). Set model.checkpoint=/path/to/weights.pth, "
                "or model.pretrained=false to start from random init."
            )
        weights, source = SHIPPED_WEIGHTS[arch](model, head_names), f"shipped {arch} weights"
    else:
        weights, source = None, "random init"
    head_kept = load_into(model, weights, head_names, source) if weights is not None else False
    original_head = _original_head(weights, head_names) if weights is not None and not head_kept else None
    if not head_kept:
        init_head(model.get_classifier(), head_init_std)

    extra_note = ""
    if lora:
        added = inject_lora(model, **lora, default_targets=lora_targets)
        head_names = _head_param_names(model)  # names changed where adapters wrap layers
        extra_note = f", LoRA +{added:,} params"

    groups = timm_groups(model, head_names, fine=fine_groups)
    head = ("pretrained head kept" if head_kept else f"new {num_outputs}-output head") + extra_note
    split = _feature_split(model)
    return Adapter(
        model=model,
        groups=groups,
        data_config=timm.data.resolve_data_config({}, model=model),
        description=f"timm {arch} ({source}, {head}, {len(groups)} layer groups)",
        pretrained_head=original_head,
        pretrained_task="imagenet" if original_head is not None and original_head.out_features == 1000 else None,
        **split,
    )


def _timm_features(model: nn.Module, x):
    # pre_logits: pooled (and for ViTs fc-normed) features; the caller runs this in eval
    # mode, so the head dropout that forward_head applies in training is off.
    return model.forward_head(model.forward_features(x), pre_logits=True)


def _feature_split(model: nn.Module) -> dict:
    """``features`` / ``classify`` for the cached-feature path, where the head's dropout is known:
    CNNs apply ``F.dropout(drop_rate)`` before the classifier, ViTs a ``head_drop`` module."""
    if isinstance(getattr(model, "head_drop", None), nn.Dropout):
        p, side = model.head_drop.p, ("head_drop",)
    elif isinstance(getattr(model, "drop_rate", None), (int, float)):
        p, side = float(model.drop_rate), ()
    else:
        return {}

    def classify(model: nn.Module, features):
        return model.get_classifier()(F.dropout(features, p=p, training=model.training))

    return {"features": _timm_features, "classify": classify, "head_side": side}


def _original_head(weights: dict, head_names: set[str]) -> nn.Linear | None:
    """The checkpoint's own linear classifier (weight + bias), kept aside when a new head replaced it."""
    weight = next((weights[n] for n in head_names if n.endswith("weight") and n in weights), None)
    bias = next((weights[n] for n in head_names if n.endswith("bias") and n in weights), None)
    if weight is None or weight.dim() != 2:
        return None
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    head.load_state_dict({"weight": weight, **({"bias": bias} if bias is not None else {})})
    return head.eval().requires_grad_(False)


def _head_param_names(model: nn.Module) -> set[str]:
    head = model.get_classifier()
    ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    return {n for n, p in model.named_parameters() if id(p) in ids}


def timm_groups(model: nn.Module, head_names: set[str], fine: bool = False) -> list[LayerGroup]:
    """timm's own ``group_matcher`` order (stem, blocks..., final), with the new head split out last."""
    if hasattr(model, "group_matcher"):
        by_id = group_parameters(model, model.group_matcher(coarse=not fine))
        ordered = [[n for n in names if n not in head_names] for _, names in sorted(by_id.items())]
    else:  # a model without a matcher still gets backbone/head, so every strategy works
        ordered = [[n for n, _ in model.named_parameters() if n not in head_names]]
    ordered = [names for names in ordered if names]
    groups = [LayerGroup(name, tuple(names)) for name, names in zip(name_groups(ordered), ordered)]
    order = [n for n, _ in model.named_parameters()]
    groups.append(LayerGroup("head", tuple(n for n in order if n in head_names)))
    return groups
