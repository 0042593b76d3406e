"""LoRA adapters (peft) injected in place, so parameter names and layer groups stay readable:
``blocks.3.attn.qkv.weight`` becomes ``blocks.3.attn.qkv.base_layer.weight`` and gains
``...qkv.lora_A.default.weight`` / ``lora_B``, all still in group ``blocks.3``."""

from __future__ import annotations

from typing import Annotated

from torch import nn

from tunelab.config.settings import FRACTION, POSITIVE, checked, integer, reads, string_list
from tunelab.errors import TunelabError


@reads("lora", filled=("model", "default_targets"), noun="LoRA")
@checked("lora")
def inject_lora(model: nn.Module,
                target_modules: Annotated[list[str] | None, string_list("e.g. [qkv, proj]: module-name suffixes", null=True)] = None,
                r: Annotated[int, integer(1)] = 8, alpha: Annotated[float, POSITIVE] = 16,
                dropout: Annotated[float, FRACTION] = 0.0, default_targets: list[str] | None = None) -> int:
    """Add LoRA adapters to the modules named by ``target_modules`` (else the model config's
    ``lora_targets``, passed as ``default_targets``); returns the parameters added."""
    from peft import LoraConfig, inject_adapter_in_model

    target_modules = target_modules or default_targets
    if not target_modules:
        raise TunelabError("strategy=lora needs lora.target_modules (module-name suffixes, e.g. [query,value]).")
    before = sum(p.numel() for p in model.parameters())
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules))
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
        raise TunelabError(f"lora.target_modules={list(target_modules)}: {err} Linear/conv module names here: {names[:20]}") from None
    return sum(p.numel() for p in model.parameters()) - before


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer back (for export)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model
