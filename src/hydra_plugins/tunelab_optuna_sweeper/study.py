"""Optuna pieces of the sweeper: storage, sampler, pruner and search space from config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DIRECTIONS = {"max": "maximize", "maximize": "maximize", "min": "minimize", "minimize": "minimize"}
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "qmc": "QMCSampler", "gp": "GPSampler"}
PRUNERS = {"median": "MedianPruner", "percentile": "PercentilePruner",
           "successive_halving": "SuccessiveHalvingPruner", "hyperband": "HyperbandPruner", "none": "NopPruner"}


class SweepConfigError(ValueError):
    """A sweeper setting that cannot work; the message names the key and the fix."""


def direction(value: str) -> str:
    try:
        return DIRECTIONS[str(value)]
    except KeyError:
        raise SweepConfigError(f"hydra.sweeper.direction must be one of {sorted(DIRECTIONS)}, got {value!r}") from None


def storage(url: str):
    """``sqlite:///x.db`` (or any database URL) -> RDB storage; a plain path -> a journal file.

    The journal file is the default: it takes many writing processes (parallel trials
    reporting intermediate values) with file locks, where SQLite would answer 'database is locked'.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if "://" in url:
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None)
    path = Path(url).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


# conf/hydra/sweeper/optuna.yaml's pruner defaults, meant for the median and percentile pruners.
# Hydra merges them into any pruner a search file picks, so one that does not take them drops them.
DEFAULT_PRUNER_KEYS = {"n_startup_trials", "n_warmup_steps"}


def _build(kind: str, names: dict[str, str], node: dict | None, key: str):
    import inspect

    import optuna

    node = dict(node or {})
    name = str(node.pop("name", "none" if kind == "pruners" else "tpe"))
    if name not in names:
        raise SweepConfigError(f"hydra.sweeper.{key}.name must be one of {', '.join(names)}, got {name!r}")
    factory = getattr(getattr(optuna, kind), names[name])
    takes = set(inspect.signature(factory).parameters)
    unknown = set(node) - takes - (DEFAULT_PRUNER_KEYS if kind == "pruners" else set())
    if unknown:
        raise SweepConfigError(f"hydra.sweeper.{key}: the {name} {kind[:-1]} takes {', '.join(sorted(takes)) or 'no settings'}; "
                               f"got {', '.join(sorted(unknown))}")
    return factory(**{k: v for k, v in node.items() if k in takes})


def sampler(node: dict | None):
    return _build("samplers", SAMPLERS, node, "sampler")


def pruner(node: dict | None):
    return _build("pruners", PRUNERS, node, "pruner")


def open_study(storage_url: str, study_name: str, direction_name: str, sampler_node: dict | None = None,
               pruner_node: dict | None = None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        storage=storage(storage_url), study_name=study_name, direction=direction(direction_name),
        sampler=sampler(sampler_node) if sampler_node is not None else None,
        pruner=pruner(pruner_node) if pruner_node is not None else None, load_if_exists=True,
    )


def distribution(override) -> Any:
    """A Hydra sweep override -> an Optuna distribution.

    ``choice(a,b)`` or ``a,b`` -> categorical; ``range(1,5)`` -> int (or float) with a step;
    ``interval(1e-5,1e-2)`` -> float; ``tag(log, interval(...))`` -> log-uniform;
    ``int(interval(8,64))`` -> int.
    """
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    key = override.get_key_element()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution([v for v in override.sweep_iterator()])
    if isinstance(value, RangeSweep):
        if all(isinstance(x, int) for x in (value.start, value.stop, value.step)):
            return IntDistribution(int(value.start), int(value.stop) - int(value.step), step=int(value.step))
        return FloatDistribution(float(value.start), float(value.stop) - float(value.step), step=float(value.step))
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise SweepConfigError(f"{key}: the Optuna sweeper cannot search {override.input_line!r}; use choice(...), "
                           "range(...), interval(...) or tag(log, interval(...))")
