"""Where the config tree lives, which ``_target_``s may be built, and checked instantiation.

Configs come from colleagues and the internet; ``hydra.utils.instantiate`` would import and
call any dotted path. tunelab builds only the targets ``tunelab.config.targets`` allows, checked on
the whole tree before anything starts and again on the resolved node it builds.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from tunelab.config.targets import check_target, refusal
from tunelab.errors import TunelabError

def conf_dir() -> Path:
    """The config root: ``$TUNELAB_CONF``, the copy inside a wheel, or the checkout's ``conf/``."""
    candidates = [os.environ.get("TUNELAB_CONF"), Path(__file__).parents[1] / "_conf", Path(__file__).resolve().parents[3] / "conf"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "train.yaml").is_file():
            return Path(candidate).resolve()
    raise TunelabError("cannot find tunelab's conf/ folder (with train.yaml); set TUNELAB_CONF=/path/to/conf.")


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("abspath"):
        OmegaConf.register_new_resolver("abspath", lambda p: str(Path(p).expanduser().resolve()))
    if not OmegaConf.has_resolver("pid"):
        # in output folder names: two runs or sweeps started in the same second must not share one
        OmegaConf.register_new_resolver("pid", lambda: os.getpid(), use_cache=True)


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


# -- cheap checks of a composed config, before anything is read or built -------------------------
# Hydra composes whatever types an override gives (trainer.max_epochs=abc is the string 'abc');
# nothing downstream expects that, so each setting a user commonly overrides is checked here
# against what it must be, and a wrong value becomes one line naming key, expectation and value.

_ABSENT = object()
REQUIRED_GROUPS = ("model", "data", "strategy", "optimizer", "trainer")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _interval(low, high, low_open, high_open) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def integer(low: int, high: int | None = None, null: bool = False):
    def ok(v):
        return (null and v is None) or (_is_int(v) and v >= low and (high is None or v <= high))
    return ok, f"an integer {_interval(low, high, False, False)}" + (" or null" if null else "")


def number(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False, null: bool = False):
    def ok(v):
        if null and v is None:
            return True
        if not _is_number(v) or (v <= low if low_open else v < low):
            return False
        return high is None or (v < high if high_open else v <= high)
    return ok, _interval(low, high, low_open, high_open) + (" or null" if null else "")  # check_config adds "a number"


def choice(*options, null: bool = False):
    def ok(v):
        return (null and v is None) or any(v is o if isinstance(o, bool) else (not isinstance(v, bool) and v == o)
                                           for o in options)
    names = [str(o).lower() if isinstance(o, bool) else str(o) for o in options] + (["null"] if null else [])
    return ok, names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def either(*rules):
    return lambda v: any(ok(v) for ok, _ in rules), " or ".join(desc for _, desc in rules)


def text(null: bool = False):
    return lambda v: (null and v is None) or (isinstance(v, str) and v != ""), "a non-empty string" + (" or null" if null else "")


def mapping(values=None, null: bool = True):
    """A dict (``{a: 1}``), each value passing ``values`` when given."""
    def ok(v):
        if null and v is None:
            return True
        return isinstance(v, DictConfig) and (values is None or all(values[0](v[k]) for k in v))
    desc = "a mapping" + (f" of names to numbers {values[1]}" if values else "") + (" (e.g. {a: 1}) or null" if null else "")
    return ok, desc


def string_list():
    return (lambda v: isinstance(v, ListConfig) and len(v) > 0 and all(isinstance(x, str) and x for x in v),
            "a non-empty list of strings, e.g. ['bias', 'norm']")


BOOL = choice(True, False)
BATCHES = (either(integer(0), number(0, 1), choice(None))[0], "null, a number of batches (an integer >= 0) or a fraction in [0, 1]")
# 0 training batches trains nothing, yet the run would end FINISHED: refused (0 val batches skips validation)
TRAIN_BATCHES = (either(integer(1), number(0, 1, low_open=True), choice(None))[0],
                 "null, a number of batches (an integer >= 1) or a fraction in (0, 1]")
SEED = integer(0, 2**32 - 1)
POSITIVE = number(0, low_open=True)
FRACTION = number(0, 1, high_open=True)

# key -> (test, what it must be); a key absent from the composed config (another strategy's
# setting, say) is not checked. Values a choice's own code checks better (data.task, module.batchnorm,
# strategy.unfreeze, data.objective...) are left to it.
RULES: dict[str, tuple] = {
    "seed": SEED,
    "model.pretrained": BOOL,
    "model.fine_groups": BOOL,
    "model.drop_rate": FRACTION,
    "model.drop_path_rate": number(0, 1, high_open=True, null=True),
    "model.head_init_std": POSITIVE,
    "optimizer.lr": POSITIVE,
    "optimizer.weight_decay": number(0),
    "optimizer.momentum": number(0, 1, high_open=True),
    "optimizer.nesterov": BOOL,
    "trainer.max_epochs": integer(1),
    "trainer.log_every_n_steps": integer(1),
    "trainer.accumulate_grad_batches": integer(1),
    "trainer.gradient_clip_val": number(0, null=True),
    "trainer.limit_train_batches": TRAIN_BATCHES,
    "trainer.limit_val_batches": BATCHES,
    "trainer.limit_test_batches": BATCHES,
    "data.batch_size": integer(1),
    "data.eval_batch_size": integer(1, null=True),
    "data.image_size": integer(8, 4096, null=True),
    "data.max_train_samples": integer(1, null=True),
    "data.samples_per_class": integer(1, null=True),
    "data.min_epoch_samples": integer(1, null=True),
    "data.num_classes": integer(2, null=True),
    "data.val_fraction": FRACTION,
    "data.test_fraction": FRACTION,
    "data.num_workers": either(choice("auto"), integer(0)),
    "data.seed": SEED,
    "data.max_length": integer(2),
    "data.max_seconds": POSITIVE,
    "data.augment": mapping(),
    "module.label_smoothing": FRACTION,
    "module.layer_decay": number(0, 1, low_open=True),
    "module.stage_rewarmup": integer(0),
    "module.group_lr_mults": mapping(POSITIVE),
    "perf.cache_features": choice("auto", True, False),
    "perf.compile": BOOL,
    "perf.channels_last": BOOL,
    "perf.fused_optimizer": choice("auto", True, False),
    "perf.compile_mode": text(null=True),
    "perf.compile_backend": text(),
    "strategy.head_epochs": integer(1),
    "strategy.probe_epochs": integer(1),
    "strategy.every": integer(1),
    "strategy.groups_per_stage": integer(1),
    "strategy.unit": choice("epoch", "step"),
    "strategy.lr_mult": POSITIVE,
    "strategy.head_lr_mult": POSITIVE,
    "strategy.probe_lr_mult": POSITIVE,
    "strategy.include_head": BOOL,
    "strategy.patterns": string_list(),
    "scheduler.warmup": number(0),
    "scheduler.min_lr_ratio": number(0, 1),
    "scheduler.pct_start": number(0, 1, low_open=True, high_open=True),
    "scheduler.div_factor": POSITIVE,
    "scheduler.final_div_factor": POSITIVE,
    "scheduler.cut_frac": number(0, 1, low_open=True, high_open=True),
    "scheduler.ratio": number(1),
    "scheduler.factor": number(0, 1, low_open=True, high_open=True),
    "scheduler.mode": choice("min", "max"),
    "scheduler.patience": integer(0),
    "scheduler.min_scale": number(0, 1, low_open=True),
    "scheduler.threshold": number(0),
    "scheduler.monitor": text(),
    "regularizer.alpha": number(0),
    "regularizer.beta": number(0),
    "lora": mapping(),
    "lora.r": integer(1),
    "lora.alpha": POSITIVE,
    "lora.dropout": FRACTION,
    "lora.target_modules": (lambda v: v is None or string_list()[0](v),
                            "null or a non-empty list of module-name suffixes, e.g. [qkv, proj]"),
    "retention.enabled": BOOL,
    "retention.samples": integer(1),
}

# FineTuneModule arguments build_parts fills itself; the rest are the `module.*` settings
_MODULE_FILLED = {"self", "adapter", "num_outputs", "task", "target_stats", "optimizer", "stages", "scheduler",
                  "regularizer", "perf"}


def _shown(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if isinstance(value, bool):
        return str(value).lower()  # as typed on the command line
    return "null" if value is None else repr(value)


def group_choices(group: str) -> str:
    folder = conf_dir() / group
    return ", ".join(sorted(f.stem for f in folder.glob("*.yaml"))) if folder.is_dir() else "?"


def _settings(target: str) -> tuple[set[str], bool] | None:
    """Parameter names of an (allowed) target, and whether it takes any keyword (``**kwargs``
    not passed on to a parent class); None when it cannot be imported (``build`` says why)."""
    import inspect

    from hydra.utils import get_method

    try:
        func = get_method(target)
        classes = [c for c in func.__mro__ if "__init__" in vars(c) and c is not object] if inspect.isclass(func) else [func]
        names: set[str] = set()
        for member in classes:
            params = inspect.signature(member).parameters.values()
            names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
            if not any(p.kind == p.VAR_KEYWORD for p in params):
                return names, False
        return names, not inspect.isclass(func)  # a class's **kwargs end at object: unknown keys fail
    except Exception:  # noqa: BLE001 - not importable or no signature
        return None


def check_kwargs(given: Any, func: Any, key: str, filled: tuple[str, ...] = ()) -> dict:
    """``given`` as a plain dict whose keys ``func`` takes: a dict splatted into a library call
    (``data.augment`` into timm's ``create_transform``...) would otherwise fail at its first call,
    after the run exists, as a TypeError from deep inside the library. ``filled`` are the
    arguments tunelab passes itself."""
    import inspect

    plain = OmegaConf.to_container(given, resolve=True) if OmegaConf.is_config(given) else dict(given or {})
    params = inspect.signature(func).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return plain  # takes anything: the library decides
    takes = sorted(n for n, p in params.items() if n not in filled and p.kind != p.VAR_POSITIONAL)
    unknown = sorted(str(k) for k in plain if str(k) not in takes)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], takes, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        where = f"{func.__module__}.{func.__qualname__}"
        raise TunelabError(f"{key}.{unknown[0]} is not an option of {where}{hint}; it takes {', '.join(takes)}.")
    return plain


def check_settings(node: Any, key: str) -> None:
    """Every key of a ``_target_`` node is a parameter of its target: a misspelt ``+strategy.head_epoch=2``
    would otherwise fail deep inside training (a partial is only called then)."""
    if not isinstance(node, DictConfig):
        return
    target = node.get("_target_") if "_target_" in node else None
    if isinstance(target, str) and refusal(target, key) is None:
        known = _settings(target)
        if known is not None and not known[1]:
            unknown = sorted(str(k) for k in node if not str(k).startswith("_") and str(k) not in known[0])
            if unknown:
                takes = ", ".join(sorted(n for n in known[0] if n != "self")) or "no settings"
                raise TunelabError(f"{key}.{unknown[0]} is not a setting of {target} (it takes {takes}); "
                                   f"remove it or fix its spelling.")
    for child in node:
        check_settings(node._get_node(child), f"{key}.{child}")


def check_config(cfg: DictConfig) -> None:
    """Cheap checks of values no type catches, before anything is built or read."""
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    for group in REQUIRED_GROUPS:  # first: without them, interpolations such as ${data.objective} fail
        node = cfg._get_node(group) if group in cfg else None
        if not isinstance(node, DictConfig) or node._is_none() or "_target_" not in node:
            if node is None or node._is_none():
                given = "null"
            elif isinstance(node, DictConfig):  # ~data with debug=smoke leaves data.batch_size & co.
                given = f"only {', '.join(map(str, node))} (no _target_)"
            else:
                given = repr(node._value())
            raise TunelabError(f"{group} must be a config choice ({group_choices(group)}), got {given}; "
                               f"pick one with {group}=<choice>.")
    for top in cfg:  # an interpolation that cannot resolve (${nope}) fails here, naming its key
        try:
            node = cfg._get_node(top)
            OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else cfg.get(top)
        except OmegaConfBaseException as err:
            message = (str(err).splitlines() or [type(err).__name__])[0].strip()
            if isinstance(err, MissingMandatoryValue) or "HydraConfig" in message:
                continue  # ???: build() names it; ${hydra:...} only resolves inside a Hydra job
            raise TunelabError(f"{getattr(err, 'full_key', None) or top}: cannot resolve its value: {message}.") from None
    for key, (ok, expected) in RULES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)  # also _ABSENT when ??? (build() reports it)
        if value is _ABSENT:
            continue
        if not ok(value):
            if expected.startswith((">", "in ")) and not _is_number(value):  # a number rule given no number
                expected = f"a {'finite ' if isinstance(value, float) else ''}number {expected}"
            raise TunelabError(f"{key} must be {expected}, got {_shown(value)}.")
    module = cfg.get("module")
    if module is not None:
        if not isinstance(module, DictConfig):
            raise TunelabError(f"module must be a mapping of settings, got {_shown(module)}.")

        known = _settings("tunelab.engine.module.FineTuneModule")
        allowed = (known[0] if known else set()) - _MODULE_FILLED
        unknown = sorted(str(k) for k in module if str(k) not in allowed)
        if known and unknown:
            raise TunelabError(f"module.{unknown[0]} is not a module setting (settings: {', '.join(sorted(allowed))}); "
                               "remove it or fix its spelling.")
    for group in ("model", "data", "strategy", "optimizer", "scheduler", "regularizer", "trainer", "callbacks"):
        check_settings(cfg.get(group), group)
    lora = cfg.get("lora")
    if isinstance(lora, DictConfig):  # keyword arguments of inject_lora (model and default_targets come from the model)
        allowed = ("target_modules", "r", "alpha", "dropout")
        unknown = sorted(str(k) for k in lora if str(k) not in allowed)
        if unknown:
            raise TunelabError(f"lora.{unknown[0]} is not a LoRA setting (settings: {', '.join(allowed)}); "
                               "remove it or fix its spelling.")
