"""Where the config tree lives, which ``_target_``s may be built, and checked instantiation.

Configs come from colleagues and the internet; ``hydra.utils.instantiate`` would import and
call any dotted path. tunelab builds only targets under the allowed modules below (extend
with ``TUNELAB_ALLOWED_TARGETS``: the user's environment decides, never the config file).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from tunelab.errors import TunelabError

ALLOWED_TARGETS = (
    "tunelab",
    "torch.optim",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.callbacks",
    "torchmetrics",
)


def conf_dir() -> Path:
    """The config root: ``$TUNELAB_CONF``, the copy inside a wheel, or the checkout's ``conf/``."""
    candidates = [os.environ.get("TUNELAB_CONF"), Path(__file__).parent / "_conf", Path(__file__).resolve().parents[2] / "conf"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "train.yaml").is_file():
            return Path(candidate).resolve()
    raise TunelabError("cannot find tunelab's conf/ folder (with train.yaml); set TUNELAB_CONF=/path/to/conf.")


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("abspath"):
        OmegaConf.register_new_resolver("abspath", lambda p: str(Path(p).expanduser().resolve()))


_register_resolvers()


def allowed_prefixes() -> tuple[str, ...]:
    extra = [p.strip() for p in os.environ.get("TUNELAB_ALLOWED_TARGETS", "").split(",") if p.strip()]
    return ALLOWED_TARGETS + tuple(extra)


def _is_allowed(target: str, prefixes: tuple[str, ...]) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def check_targets(node: Any, path: str = "") -> None:
    """Refuse any ``_target_`` outside the allowed modules, anywhere in the tree."""
    prefixes = allowed_prefixes()
    if isinstance(node, DictConfig):
        target = node._get_node("_target_") if "_target_" in node else None
        if target is not None:
            value = str(target._value())
            if not _is_allowed(value, prefixes):
                raise TunelabError(
                    f"{path or '<root>'}._target_={value!r} is outside the allowed modules "
                    f"({', '.join(prefixes)}). If you trust this config, allow it with "
                    f"TUNELAB_ALLOWED_TARGETS={value.rsplit('.', 1)[0]}"
                )
        for key in node.keys():
            check_targets(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            check_targets(node._get_node(i), f"{path}[{i}]")


def build(node: DictConfig, what: str, **kwargs: Any) -> Any:
    """``instantiate`` with the allow-list, and tunelab's own errors surfaced unwrapped."""
    check_targets(node, what)
    missing = sorted(OmegaConf.missing_keys(node)) if isinstance(node, (DictConfig, ListConfig)) else []
    if missing:  # checked here: a `_partial_` target would defer the error to its first call
        # already full dotted keys, e.g. data.source.root
        raise TunelabError(f"{', '.join(missing)} must be set: add {missing[0]}=<value> to the command line.")
    try:
        built = instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, TunelabError):
            raise cause from None
        raise TunelabError(f"cannot build {what}: {err}") from err
    if isinstance(built, functools.partial) and type(built) is not functools.partial:
        # Hydra's partials re-authorise their target on every call (~0.1 ms); the LR schedule is
        # called for every param group at every step. The target passed the allow-list above.
        built = functools.partial(built.func, *built.args, **built.keywords)
    return built


def check_config(cfg: DictConfig) -> None:
    """Cheap checks of values no type catches, before anything is built or read."""
    lr = cfg.optimizer.get("lr")
    if lr is None or not float(lr) > 0:
        raise TunelabError(f"optimizer.lr must be > 0, got {lr}.")
    if int(cfg.trainer.max_epochs) < 1:
        raise TunelabError(f"trainer.max_epochs must be >= 1, got {cfg.trainer.max_epochs}.")
