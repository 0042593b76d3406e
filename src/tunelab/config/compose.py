"""A ``tunelab-train`` command line as Hydra will see it: its overrides, every job of a sweep, the
composed config of each, and Hydra's own settings judged before Hydra starts. No torch: the
command line's errors answer before the engine is imported."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from tunelab.config.hydra_guard import check_hydra
from tunelab.config.root import conf_dir
from tunelab.errors import TunelabError


MAX_COMBINATIONS = 256  # a grid this large is checked on its first combinations only, and says so


def compose_run(overrides: list[str]) -> DictConfig:
    """The config a run with these overrides would get, Hydra's own settings included."""
    return compose_root("train", overrides, with_hydra=True)


def compose_root(root: str, overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """The root config ``conf/<root>.yaml`` composed with ``overrides``; Hydra's errors in one line."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            return compose(root, overrides=list(overrides), return_hydra_config=with_hydra)
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as err:  # a YAML !!python tag & co.: one line
        raise TunelabError(_one_line(err)) from None


def _one_line(err: Exception) -> str:
    text = str(err).split("Config search path:")[0]  # Hydra's search path: one line per provider
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 2 and lines[1].startswith("Available options"):  # a missing choice: name the others
        return f"{lines[0]}. {lines[1]} {', '.join(o for o in lines[2:] if not o.startswith('_'))}"
    return " ".join(lines[:2]) if lines else type(err).__name__

# -- sweeps: every combination a sweep would run ----------------------------------------------------
def _values(override) -> list:
    """The values an override sweeps over: a choice's options, a range's numbers, an interval's ends."""
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return list(value.list)
    if isinstance(value, RangeSweep):
        return list(override.sweep_iterator())
    if isinstance(value, IntervalSweep):  # its ends bound anything the value changes (the schedule)
        ends = [value.start, value.end]
        return [int(v) for v in ends] if "int" in (value.tags or ()) else ends
    return [value]


def _as_text(value) -> str:
    if isinstance(value, str):
        return value
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def combinations(overrides: list[str]) -> tuple[list[list[str]], str]:
    """Every run's overrides: the command line's sweeps (a,b / range / choice) times the swept
    parameters of the composed ``hydra.sweeper.params`` (experiment files, Optuna searches)."""
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except Exception as err:  # noqa: BLE001 - Hydra's parse errors: one line
        raise TunelabError(_one_line(err)) from None
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    axes = {o.get_key_element(): _values(o) for o in parsed if o.is_sweep_override()}
    base = compose_run(fixed + [f"{k}={_as_text(v[0])}" for k, v in axes.items()])
    for key, spec in (OmegaConf.select(base, "hydra.sweeper.params") or {}).items():
        if key not in axes:  # the command line wins over the file, as in Hydra's sweepers
            axes[str(key)] = _values(parser.parse_override(f"{key}={spec}"))
    grid = list(itertools.islice(itertools.product(*axes.values()), MAX_COMBINATIONS + 1))
    note = ""
    if len(grid) > MAX_COMBINATIONS:
        grid, note = grid[:MAX_COMBINATIONS], f" (the first {MAX_COMBINATIONS} combinations)"
    runs = [fixed + [f"{k}={_as_text(v)}" for k, v in zip(axes, combo)] for combo in grid]
    return runs, note

@contextmanager
def as_hydra_job(cfg: DictConfig) -> Iterator[DictConfig]:
    """``cfg`` without its ``hydra`` node, with Hydra's job state set from it as a real run would
    have it, and the previous state back afterwards: a check or a notebook fit() must not leave
    its choices (or a sweep's mode) to the next run in this process."""
    hydra = HydraConfig.instance()
    previous = hydra.cfg
    hydra.set_config(cfg)
    with open_dict(cfg):
        cfg.pop("hydra")
    try:
        yield cfg
    finally:
        hydra.cfg = previous

# Hydra's flags that take a value, and those a tunelab run refuses: tunelab has one primary config
# (add folders with hydra.searchpath, which the checks see), and a rerun unpickles a file.
VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--info", "-i", "--shell-completion", "-sc")
REFUSED_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun")


def command_overrides(argv: list[str]) -> list[str]:
    """The overrides of a ``tunelab-train`` command line, without Hydra's flags and their values."""
    overrides, skip = [], False
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in REFUSED_FLAGS:
            raise TunelabError(f"{flag} is not supported by tunelab-train: its config is train.yaml in "
                               f"{conf_dir()}; add your own config folders with hydra.searchpath=[file:///path].")
        if skip or arg.startswith("-"):
            skip = arg in VALUE_FLAGS
            continue
        overrides.append(arg)
    return overrides


def check_before_hydra(argv: list[str]) -> None:
    """What Hydra itself will act on (``hydra.*``) judged before it starts: every job's, when a
    sweep changes Hydra's settings, else the command's one composition."""
    overrides = command_overrides(argv)
    runs, _ = combinations(overrides) if any("," in o or "(" in o for o in overrides) else ([overrides], "")
    hydra_swept = any(o.lstrip("+~").startswith("hydra.") for run in runs for o in run if o not in overrides)
    for run in runs if hydra_swept else runs[:1]:
        check_hydra(compose_run(run), overrides)
