"""Settings checked where they are used: the signature that reads a setting declares what it
must be, and validation reads those signatures before any run exists.

A constraint rides on the parameter as ``Annotated[int, integer(1)]``. Every ``_target_`` node of a
config is checked against its target's signature (``check_call``): unknown keys are refused, and
annotated values must pass their constraint. A node without a ``_target_`` (``perf``, ``lora``,
``module``...) is checked against the function that reads it, registered with ``reads``.
Nothing here lists groups or keys: a new group is checked because its target has a signature.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

from hydra.utils import get_method
from omegaconf import DictConfig, ListConfig, OmegaConf

from tunelab.config import check_targets
from tunelab.errors import TunelabError


class Rule(NamedTuple):
    """What a setting must be: a test, and the words for it in an error."""

    ok: Callable[[Any], bool]
    expected: str


class Extension(NamedTuple):
    """Marks a parameter filled by building the top-level config node of the same name
    (``optimizer``, ``loss``...): an extension point, not a setting of its own node."""


EXTENSION = Extension()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _interval(low, high, low_open, high_open) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def integer(low: int, high: int | None = None, null: bool = False) -> Rule:
    def ok(v):
        return (null and v is None) or (_is_int(v) and v >= low and (high is None or v <= high))
    return Rule(ok, f"an integer {_interval(low, high, False, False)}" + (" or null" if null else ""))


def number(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False,
           null: bool = False) -> Rule:
    def ok(v):
        if null and v is None:
            return True
        if not _is_number(v) or (v <= low if low_open else v < low):
            return False
        return high is None or (v < high if high_open else v <= high)
    return Rule(ok, _interval(low, high, low_open, high_open) + (" or null" if null else ""))  # expect adds "a number"


def choice(*options, null: bool = False) -> Rule:
    def ok(v):
        return (null and v is None) or any(v is o if isinstance(o, bool) else (not isinstance(v, bool) and v == o)
                                           for o in options)
    names = [str(o).lower() if isinstance(o, bool) else str(o) for o in options] + (["null"] if null else [])
    return Rule(ok, names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}")


def either(*rules: Rule, expected: str | None = None) -> Rule:
    return Rule(lambda v: any(r.ok(v) for r in rules), expected or " or ".join(r.expected for r in rules))


def text(null: bool = False) -> Rule:
    return Rule(lambda v: (null and v is None) or (isinstance(v, str) and v != ""),
                "a non-empty string" + (" or null" if null else ""))


def mapping(values: Rule | None = None, null: bool = True) -> Rule:
    """A dict (``{a: 1}``), each value passing ``values`` when given."""
    def ok(v):
        if null and v is None:
            return True
        return isinstance(v, (dict, DictConfig)) and (values is None or all(values.ok(v[k]) for k in v))
    return Rule(ok, "a mapping" + (f" of names to numbers {values.expected}" if values else "")
                + (" (e.g. {a: 1}) or null" if null else ""))


def string_list(example: str = "e.g. ['bias', 'norm']", null: bool = False) -> Rule:
    def ok(v):
        return (null and v is None) or (isinstance(v, (list, ListConfig)) and len(v) > 0
                                        and all(isinstance(x, str) and x for x in v))
    return Rule(ok, ("null or " if null else "") + f"a non-empty list of strings, {example}")


BOOL = choice(True, False)
# 0 training batches trains nothing, yet the run would end FINISHED: refused (0 val batches skips validation)
TRAIN_BATCHES = either(integer(1), number(0, 1, low_open=True), choice(None),
                       expected="null, a number of batches (an integer >= 1) or a fraction in (0, 1]")
BATCHES = either(integer(0), number(0, 1), choice(None),
                 expected="null, a number of batches (an integer >= 0) or a fraction in [0, 1]")
SEED = integer(0, 2**32 - 1)
POSITIVE = number(0, low_open=True)
FRACTION = number(0, 1, high_open=True)


def shown(value: Any) -> str:
    """A config value as the user would type it."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else repr(value)


def expect(value: Any, rule: Rule, key: str) -> Any:
    """``value`` when it passes ``rule``, else one line naming key, expectation and value."""
    if rule.ok(value):
        return value
    expected = rule.expected
    if expected.startswith((">", "in ")) and not _is_number(value):  # a number rule given no number
        expected = f"a {'finite ' if isinstance(value, float) else ''}number {expected}"
    raise TunelabError(f"{key} must be {expected}, got {shown(value)}.")


# -- what a callable takes ------------------------------------------------------------------------
def _members(func: Any) -> list:
    """The callables whose parameters ``func`` accepts: a class's ``__init__`` and its parents'
    while each passes ``**kwargs`` on."""
    if not inspect.isclass(func):
        return [func]
    return [c.__init__ for c in func.__mro__ if "__init__" in vars(c) and c is not object]


@lru_cache(maxsize=512)
def signature_of(func: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    """(parameters by name, whether it takes any other keyword) of a callable or class."""
    params: dict[str, inspect.Parameter] = {}
    for member in _members(func):
        found = inspect.signature(member).parameters
        params.update({n: p for n, p in found.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                       and n not in params})
        if not any(p.kind == p.VAR_KEYWORD for p in found.values()):
            return params, False
    return params, not inspect.isclass(func)  # a class's **kwargs end at object: unknown keys fail


@lru_cache(maxsize=512)
def annotations_of(func: Any) -> dict[str, tuple]:
    """Each parameter's ``Annotated`` metadata (rules and markers); empty where the hints of a
    library's signature cannot be resolved (its value checks are then the library's own)."""
    found: dict[str, tuple] = {}
    for member in _members(func):
        try:
            hints = typing.get_type_hints(inspect.unwrap(member), include_extras=True)
        except Exception:  # noqa: BLE001 - forward references a library never resolves
            continue
        for name, hint in hints.items():
            if typing.get_origin(hint) is typing.Annotated and name not in found:
                found[name] = hint.__metadata__
    return found


def rules_of(func: Any) -> dict[str, Rule]:
    return {n: m for n, meta in annotations_of(func).items() for m in meta if isinstance(m, Rule)}


def extension_points(func: Any) -> tuple[str, ...]:
    """The parameters of ``func`` marked ``EXTENSION``, in signature order."""
    marked = {n for n, meta in annotations_of(func).items() if EXTENSION in meta}
    return tuple(n for n in signature_of(func)[0] if n in marked)


def settings_taken(func: Any, filled: tuple[str, ...] = ()) -> list[str]:
    """The names a config node for ``func`` may give: its keyword parameters, less those tunelab
    fills itself (positional-only ones, extension points and ``filled``)."""
    params, _ = signature_of(func)
    skip = set(filled) | set(extension_points(func)) | {"self"}
    return [n for n, p in params.items() if n not in skip and p.kind != p.POSITIONAL_ONLY]


def qualified(func: Any) -> str:
    return f"{func.__module__}.{func.__qualname__}"


def check_call(func: Any, node: Any, key: str, *, filled: tuple[str, ...] = (), closed: bool = True,
               noun: str | None = None, where: str | None = None, origin: str = "") -> None:
    """``node``'s keys are settings ``func`` takes, and each annotated one passes its rule.
    ``noun`` words an unknown key as "not a <noun> setting", else as "not a setting of <where>".
    ``origin`` says where the node may come from (" (from the command line or experiment=x)")."""
    if node is None or (isinstance(node, DictConfig) and node._is_none()):
        return
    if not isinstance(node, (dict, DictConfig)):
        raise TunelabError(f"{key} must be a mapping of settings, got {shown(node)}.")
    given = [str(k) for k in node if not str(k).startswith("_")]
    takes = settings_taken(func, filled)
    if closed and not signature_of(func)[1]:
        unknown = [k for k in given if k not in takes]
        if unknown:
            raise TunelabError(_unknown(unknown[0], _listed(func, takes, node), key, noun or where or qualified(func),
                                        bool(noun)) + f"; remove it or fix its spelling{origin}.")
    for name, rule in rules_of(func).items():
        if name in given and name in takes and not _missing(node, name):  # ???: build() names it
            expect(node[name], rule, f"{key}.{name}" if key else name)


def _listed(func: Any, takes: list[str], node: Any) -> list[str]:
    """The settings named in an error: a ``_partial_`` node's required parameters are its caller's
    (a loss's outputs, a strategy's groups), unless the node gives them."""
    if not (isinstance(node, DictConfig) and node.get("_partial_")):
        return takes
    params = signature_of(func)[0]
    return [n for n in takes if params[n].default is not params[n].empty or n in node]


def _missing(node: Any, name: str) -> bool:
    return isinstance(node, DictConfig) and node._get_node(name)._is_missing()


def _unknown(name: str, takes: list[str], key: str, owner: str, is_noun: bool) -> str:
    close = difflib.get_close_matches(name, takes, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    if is_noun:
        listed = f"(settings: {', '.join(takes)})"
        return f"{key}.{name} is not a {owner} setting {listed}{hint}"
    listed = f"(it takes {', '.join(sorted(takes)) or 'no settings'})"
    return f"{key}.{name} is not a setting of {owner} {listed}{hint}"


def accepted(node: DictConfig, kwargs: dict) -> dict:
    """The ``kwargs`` that ``node``'s (allowed) target takes: an image size means nothing to a
    text model, and the modality check that follows gives the real error."""
    check_targets(node, "model")
    try:
        params = inspect.signature(get_method(node._target_)).parameters
    except Exception:  # noqa: BLE001 - an unknown target: build() reports it properly
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


# -- nodes without a _target_, checked against the function that reads them -------------------------
@dataclass(frozen=True)
class Reader:
    key: str  # the dotted config key, e.g. "perf" or "data.augment"
    func: Callable
    filled: tuple[str, ...] = ()
    closed: bool = True
    noun: str | None = None

    def check(self, cfg: DictConfig, origin: str = "") -> None:
        node = OmegaConf.select(cfg, self.key, default=None, throw_on_missing=False) if self.key else cfg
        check_call(self.func, node, self.key, filled=self.filled, closed=self.closed, noun=self.noun, origin=origin)


READERS: dict[str, Reader] = {}


def reads(key: str, *, filled: tuple[str, ...] = (), closed: bool = True, noun: str | None = None,
          func: Callable | None = None):
    """Declare ``func`` as the reader of config node ``key``: its signature is that node's schema.
    Used as a decorator (``@reads("perf")``) or, for a library function, with ``func=``."""
    def register(reader: Callable) -> Callable:
        READERS[key] = Reader(key, reader, filled, closed, noun)
        return reader
    return register(func) if func is not None else register


def checked(key: str):
    """Check a construct-once function's annotated arguments when Python code calls it directly
    (a notebook, a test); configs are checked before the run by ``check_call``."""
    def wrap(func):
        signature = inspect.signature(func)

        @functools.wraps(func)
        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            for name, rule in rules_of(func).items():
                if name in bound.arguments:
                    expect(bound.arguments[name], rule, f"{key}.{name}")
            return func(*args, **kwargs)
        return call
    return wrap
