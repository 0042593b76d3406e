"""The config groups of train.yaml: which a run cannot do without, and the choices each offers."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

from tunelab.config.root import conf_dir


@lru_cache(maxsize=4)
def _required(root: Path) -> tuple[str, ...]:
    defaults = (yaml.safe_load((root / "train.yaml").read_text()) or {}).get("defaults", [])
    groups = []
    for entry in defaults:
        if isinstance(entry, dict):
            (group, choice), = entry.items()
            if choice is not None and group != "hydra" and not (root / group / "none.yaml").is_file():
                groups.append(group)
    return tuple(groups)


def required_groups() -> tuple[str, ...]:
    """The groups train.yaml picks a choice for, except those that ship a ``none`` choice (the
    way to run without one): a run needs each. (Hydra's ``optional`` would also hide a
    misspelt choice, so it is not used for this.)"""
    return _required(conf_dir())


@lru_cache(maxsize=32)
def _builds(root: Path, group: str) -> bool:
    def node(file: Path) -> dict:  # a '@package _global_' choice writes its group's node by name
        loaded = yaml.safe_load(file.read_text()) or {}
        return loaded.get(group) or {} if "@package _global_" in file.read_text()[:300] else loaded

    files = sorted((root / group).glob("*.yaml"))
    return any("_target_" in node(f) for f in files)  # choices that extend another (defaults:) hold none


def builds_target(group: str) -> bool:
    """Whether the shipped choices of ``group`` are ``_target_``s to build (model, data...), as
    opposed to plain settings (logger, paths)."""
    return _builds(conf_dir(), group)


def group_choices(group: str) -> str:
    folder = conf_dir() / group
    return ", ".join(sorted(f.stem for f in folder.glob("*.yaml"))) if folder.is_dir() else "?"
