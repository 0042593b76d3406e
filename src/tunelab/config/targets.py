"""Which ``_target_``s a config may build: named objects, judged by identity after resolution.

``hydra.utils.instantiate`` imports and calls any dotted path, so a config from a colleague or
the internet could run anything. A target is allowed only if the object it resolves to is one
of these, whatever its spelling (``torch.optim.adamw.AdamW`` is ``torch.optim.AdamW``;
``tunelab.config.Path.touch`` is ``pathlib.Path.touch`` and is refused):

- the targets tunelab's own ``conf/`` names (discovered from the files, never a kept list);
- optimizers and LR schedulers of ``torch.optim``; ``lightning.pytorch.Trainer`` and the
  callbacks ``lightning.pytorch.callbacks`` exports;
- torchmetrics' classification, regression and aggregation metrics (not the ones that load a
  model, such as CLIPScore, which may run a model's remote code);
- what the user's environment declares in ``TUNELAB_ALLOWED_TARGETS`` (module prefixes or
  symbols), read when tunelab starts: the environment decides, never a config file.

Console-script entry points (``tunelab.cli.ui.main``...) are never targets: a config may not turn a
training run into a server.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from pathlib import Path
from typing import Any

from tunelab.config.root import conf_dir
from tunelab.errors import TunelabError

ENV = "TUNELAB_ALLOWED_TARGETS"
SUMMARY = ("tunelab's config targets, torch.optim optimizers and LR schedulers, lightning.pytorch.Trainer "
           "and its callbacks, torchmetrics classification/regression/aggregation metrics")
_SAFE_METRIC_PACKAGES = ("torchmetrics.classification", "torchmetrics.regression", "torchmetrics.aggregation")
_TARGET_LINE = re.compile(r"^\s*_target_:\s*([\w.]+)\s*$", re.MULTILINE)
_user_declared: tuple[str, ...] | None = None  # frozen by freeze_environment()


def freeze_environment() -> None:
    """Read ``TUNELAB_ALLOWED_TARGETS`` now, before Hydra applies anything a config asks for
    (``hydra.job.env_set`` is refused as well; this is the second wall)."""
    global _user_declared
    _user_declared = _read_declared()


def _read_declared() -> tuple[str, ...]:
    return tuple(p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip())


def user_declared() -> tuple[str, ...]:
    return _user_declared if _user_declared is not None else _read_declared()


def shipped_targets(conf: Path) -> set[str]:
    """Every ``_target_`` written in tunelab's own config tree."""
    return {m for f in conf.rglob("*.yaml") for m in _TARGET_LINE.findall(f.read_text())}


def _subclasses_in(module: Any, base: type) -> list[type]:
    return [obj for obj in vars(module).values() if inspect.isclass(obj) and issubclass(obj, base) and obj is not base]


@functools.lru_cache(maxsize=1)
def _library_objects() -> frozenset:
    import lightning.pytorch as pl
    import torch.optim
    import torchmetrics
    from lightning.pytorch import callbacks

    found: list[Any] = [pl.Trainer]
    found += _subclasses_in(torch.optim, torch.optim.Optimizer)
    found += _subclasses_in(torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler)
    found += [getattr(callbacks, name) for name in callbacks.__all__]
    metrics = _subclasses_in(torchmetrics, torchmetrics.Metric)
    for package in _SAFE_METRIC_PACKAGES:
        metrics += _subclasses_in(__import__(package, fromlist=["_"]), torchmetrics.Metric)
    found += [m for m in metrics if m.__module__.startswith(_SAFE_METRIC_PACKAGES)]
    return frozenset(found)


@functools.lru_cache(maxsize=4)
def _shipped_objects(conf: Path) -> frozenset:
    from hydra._internal.utils import _locate

    objects = []
    for name in shipped_targets(conf):
        if name.startswith("hydra_plugins."):
            continue  # sweepers and launchers: Hydra builds them, judged by hydra_guard
        try:
            objects.append(_locate(name))
        except Exception:  # noqa: BLE001 - an optional extra not installed: it cannot be built anyway
            continue
    return frozenset(objects)


def _declared_by_user(name: str, obj: Any) -> bool:
    """A prefix the user declared covers objects spelled *and* defined under it."""
    module = getattr(obj, "__module__", None) or type(obj).__module__
    under = lambda text, p: text == p or text.startswith(p + ".")  # noqa: E731
    return any(under(name, p) and (under(module, p) or under(f"{module}.{getattr(obj, '__qualname__', '')}", p))
               for p in user_declared())


def refusal(name: Any, where: str) -> str | None:
    """Why ``name`` may not be built at ``where`` (a dotted config key), or None when it may."""
    from hydra._internal.utils import _locate  # get_object, without its error log line


    if not isinstance(name, str) or "${" in name:
        return f"{where}._target_={name!r} is not a plain dotted name (a target may not be interpolated); write it out."
    try:
        obj = _locate(name)
    except Exception:  # noqa: BLE001 - nothing by that name: refused, never judged "unknown so fine"
        return f"{where}._target_={name!r} does not name an importable object; check its spelling."
    fix = f"If you trust this config, allow it with {ENV}={name.rsplit('.', 1)[0]}"
    try:
        allowed = obj in _library_objects() or obj in _shipped_objects(conf_dir()) or _declared_by_user(name, obj)
    except TypeError:  # unhashable: no class or function we build
        allowed = _declared_by_user(name, obj)
    if allowed:
        return None
    return f"{where}._target_={name!r} is outside the allowed targets ({SUMMARY}). {fix}"


def check_target(name: Any, where: str) -> None:
    reason = refusal(name, where)
    if reason:
        raise TunelabError(reason)
