"""Where the config tree lives, which ``_target_``s may be built, and checked instantiation.

Configs come from colleagues and the internet; ``hydra.utils.instantiate`` would import and
call any dotted path. tunelab builds only the targets ``tunelab.config.targets`` allows, checked on
the whole tree before anything starts and again on the resolved node it builds.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from tunelab.config.root import conf_dir
from tunelab.config.targets import check_target
from tunelab.errors import TunelabError

__all__ = ["build", "check_plain_targets", "check_targets", "conf_dir"]

def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("abspath"):
        OmegaConf.register_new_resolver("abspath", lambda p: str(Path(p).expanduser().resolve()))
    if not OmegaConf.has_resolver("pid"):
        # in output folder names: two runs or sweeps started in the same second must not share one
        OmegaConf.register_new_resolver("pid", lambda: os.getpid(), use_cache=True)
    if not OmegaConf.has_resolver("gpus_of"):
        # a cluster launcher's request: one task per device, no GPUs for a CPU trainer (whose
        # node may have none)
        OmegaConf.register_new_resolver("device_count", _device_count)
        OmegaConf.register_new_resolver("gpus_of", lambda accelerator, devices: (
            None if str(accelerator) == "cpu" else _device_count(devices)))


def _device_count(devices: Any) -> int:
    """trainer.devices as a count: 4, or a list of device ids."""
    return len(devices) if isinstance(devices, (list, tuple, ListConfig)) else int(devices)


_register_resolvers()


def check_targets(node: Any, path: str = "") -> None:
    """Refuse any ``_target_`` that is not an allowed object (``tunelab.config.targets``), anywhere in
    the tree: judged on the name that will be built, so an interpolated target is refused and a
    node made by a resolver (``${oc.create:...}``) is judged after it resolves."""
    if isinstance(node, (DictConfig, ListConfig)) and (node._is_none() or node._is_missing()):
        return
    if isinstance(node, DictConfig):
        if "_target_" in node:
            check_target(node._get_node("_target_")._value(), path or "<root>")
        for key in node.keys():
            _check_child(node, key, f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            _check_child(node, i, f"{path}[{i}]")
    elif isinstance(node, (dict, list)):  # resolved, plain containers (build() and stored configs)
        check_plain_targets(node, path)


def _check_child(parent: DictConfig | ListConfig, key: Any, path: str) -> None:
    child = parent._get_node(key)
    if not (child is not None and child._is_interpolation()):
        check_targets(child, path)
        return
    try:  # a reference or a resolver: judge what it resolves to
        resolved = parent[key]
    except Exception as err:  # noqa: BLE001 - unresolvable until the job runs (${hydra:...}); build() judges it then
        if any(r in str(child._value()) for r in ("oc.create", "oc.decode")):
            raise TunelabError(f"{path}={child._value()!r} makes config nodes but cannot be resolved yet "
                               f"({type(err).__name__}); write the node out.") from None
        return
    if isinstance(resolved, (DictConfig, ListConfig)):
        check_targets(resolved, path)


def check_plain_targets(node: Any, path: str = "") -> None:
    """``check_targets`` for resolved plain containers."""
    if isinstance(node, dict):
        if "_target_" in node:
            check_target(node["_target_"], path or "<root>")
        for key, value in node.items():
            check_plain_targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_plain_targets(value, f"{path}[{i}]")


def build(node: DictConfig, what: str, **kwargs: Any) -> Any:
    """``instantiate`` with the allow-list, and tunelab's own errors surfaced unwrapped."""
    check_targets(node, what)
    missing = sorted(OmegaConf.missing_keys(node)) if isinstance(node, (DictConfig, ListConfig)) else []
    if missing:  # checked here: a `_partial_` target would defer the error to its first call
        # already full dotted keys, e.g. data.source.root
        raise TunelabError(f"{', '.join(missing)} must be set: add {missing[0]}=<value> to the command line.")
    if isinstance(node, (DictConfig, ListConfig)):  # again on exactly what instantiate will see
        check_plain_targets(OmegaConf.to_container(node, resolve=True), what)
    try:
        built = instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, TunelabError):
            raise cause from None
        # one line: Hydra's message spans three ("Error in call to target ...", the cause, full_key)
        target = node.get("_target_", "?") if isinstance(node, DictConfig) else "?"
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(err)
        raise TunelabError(f"cannot build {what} ({target}): {' '.join(reason.split())}") from err
    if isinstance(built, functools.partial) and type(built) is not functools.partial:
        # Hydra's partials re-authorise their target on every call (~0.1 ms); the LR schedule is
        # called for every param group at every step. The target passed the allow-list above.
        built = functools.partial(built.func, *built.args, **built.keywords)
    return built
