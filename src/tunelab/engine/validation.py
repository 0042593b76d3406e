"""A composed config checked against the code that will read it, before anything is read or built.

Hydra composes whatever an override gives (``trainer.max_epochs=abc`` is the string ``'abc'``).
Each check here is declared by the code that uses the setting: a ``_target_`` node by its target's
signature, a plain node (``perf``, ``lora``, ``module``...) by its registered reader
(``tunelab.config.settings.reads``). So a config group added from a user folder is checked like a
shipped one, with nothing to list.
"""

from __future__ import annotations

from typing import Annotated, Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from tunelab.adapters import lora
from tunelab.config.groups import builds_target, group_choices, required_groups
from tunelab.config.settings import READERS, SEED, check_call, reads
from tunelab.config.targets import refusal
from tunelab.data import images
from tunelab.engine import budget, module, param_groups, perf, retention
from tunelab.errors import TunelabError

# imported for the readers they declare (lora, data.augment, trainer, module, optimizer, perf, retention)
READER_MODULES = (lora, images, budget, module, param_groups, perf, retention)


@reads("", closed=False)
def run_settings(seed: Annotated[int, SEED] = 42) -> None:
    """The top-level settings of a run read as values (the groups are checked by their nodes)."""


def check_config(cfg: DictConfig, origin: str = "") -> None:
    """Values and keys no type catches, one line for the first problem. ``origin`` names where a
    setting may come from besides tunelab's files (" (from the command line or experiment=x)")."""
    check_groups(cfg)
    check_resolvable(cfg)
    for reader in sorted(READERS.values(), key=lambda r: r.key):  # the root first: seed=-1, not data.seed
        reader.check(cfg, origin)
    check_built_nodes(cfg, origin=origin)


def check_groups(cfg: DictConfig) -> None:
    """Every group a run needs is there (first: without them ${data.objective} & co. fail)."""
    for group in required_groups():
        node = cfg._get_node(group) if group in cfg else None
        if isinstance(node, DictConfig) and not node._is_none() and ("_target_" in node or not builds_target(group)):
            continue
        if node is None or node._is_none():
            given = "null"
        elif isinstance(node, DictConfig):  # ~data with debug=smoke leaves data.batch_size & co.
            given = f"only {', '.join(map(str, node))} (no _target_)"
        else:
            given = repr(node._value())
        raise TunelabError(f"{group} must be a config choice ({group_choices(group)}), got {given}; "
                           f"pick one with {group}=<choice>.")


def check_resolvable(cfg: DictConfig) -> None:
    """An interpolation that cannot resolve (``${nope}``) fails here, naming its key."""
    for top in cfg:
        try:
            node = cfg._get_node(top)
            OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else cfg.get(top)
        except OmegaConfBaseException as err:
            message = (str(err).splitlines() or [type(err).__name__])[0].strip()
            if isinstance(err, MissingMandatoryValue) or "HydraConfig" in message:
                continue  # ???: build() names it; ${hydra:...} only resolves inside a Hydra job
            raise TunelabError(f"{getattr(err, 'full_key', None) or top}: cannot resolve its value: {message}.") from None


def check_built_nodes(node: Any, path: str = "", origin: str = "") -> None:
    """Every ``_target_`` node anywhere in the tree against its target's signature."""
    if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
        target = node._get_node("_target_")._value() if "_target_" in node else None
        if isinstance(target, str) and refusal(target, path) is None:
            check_call(_located(target), node, path, where=target, origin=origin)
        for key in node:
            if not str(key).startswith("_") and (path or key != "hydra"):
                check_built_nodes(node._get_node(key), f"{path}.{key}" if path else str(key), origin)
    elif isinstance(node, ListConfig) and not node._is_none() and not node._is_missing():
        for i in range(len(node)):
            check_built_nodes(node._get_node(i), f"{path}[{i}]", origin)


def _located(target: str) -> Any:
    try:
        return get_object(target)
    except Exception as err:  # noqa: BLE001 - the allow-list passed it, so it imports; say why if not
        raise TunelabError(f"cannot import {target}: {type(err).__name__}: {err}") from None
