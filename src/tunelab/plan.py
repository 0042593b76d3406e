"""``tunelab-train --check`` and ``tunelab.check()``: everything a run validates before it starts,
without the run.

Composes the command's config (every combination of a sweep, every categorical combination of
an Optuna search), runs the same checks ``train()`` runs, and with ``deep`` also reads the data
labels, builds the model and plans the stages against the budget. Nothing is written: no run,
no output folder, no checkpoint.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from tunelab.config import check_config, check_targets, conf_dir
from tunelab.errors import TunelabError

FLAGS = ("-m", "--multirun", "--check")
MAX_COMBINATIONS = 256  # a grid this large is checked on its first combinations only, and says so


def compose_run(overrides: list[str]) -> DictConfig:
    """The config a run with these overrides would get, Hydra's own settings included."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            return compose("train", overrides=list(overrides), return_hydra_config=True)
    except HydraException as err:
        raise TunelabError(_one_line(err)) from None


def _one_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(err).__name__


def global_groups(root: Path) -> set[str]:
    """Groups whose files write at the top level (``# @package _global_``): a key named after one
    means a user file forgot that line and nothing will read its settings."""
    found = set()
    for folder in root.iterdir():
        files = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
        if files and all("@package _global_" in f.read_text()[:300] for f in files):
            found.add(folder.name)
    return found


@lru_cache(maxsize=4)
def top_level_keys(root: Path) -> tuple[frozenset[str], frozenset[str]]:
    """(keys train.yaml declares, groups that write under their own name), read once per config
    tree: a sweep's --check and every run ask for each of its jobs."""
    declared = set(OmegaConf.load(root / "train.yaml")) - {"defaults"}
    groups = {p.name for p in root.iterdir() if p.is_dir()} - global_groups(root)
    return frozenset(declared), frozenset(groups)


def check_top_level(cfg: DictConfig, choices: dict | None = None) -> None:
    """Every top-level key is one train.yaml declares or a config group's: anything else (a
    misplaced ``@package``, ``+nonsense=1``) would compose and then be silently ignored."""
    declared, groups = top_level_keys(conf_dir())
    for key in map(str, cfg):
        if key in declared or key in groups or key.startswith("_") or key == "hydra":
            continue
        source = ""
        if choices and choices.get(key):
            source = (f" It comes from {key}={choices[key]}: put '# @package _global_' on the first line "
                      f"of conf/{key}/{choices[key]}.yaml (or its copy on hydra.searchpath).")
        raise TunelabError(f"top-level key '{key}' is not a tunelab setting, so nothing would read it.{source} "
                           f"Top-level settings: {', '.join(sorted(declared | groups))}.")


def validate(cfg: DictConfig, choices: dict | None = None) -> None:
    """The checks every run makes before anything is read or built (train() and --check)."""
    check_targets(cfg)
    check_config(cfg)
    check_top_level(cfg, choices)


# -- sweeps: every combination a sweep would run ----------------------------------------------------
def _values(override) -> list:
    """The values an override sweeps over: a choice's options, a range's numbers, an interval's ends."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

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
    from hydra.core.override_parser.overrides_parser import OverridesParser

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


# -- one run -----------------------------------------------------------------------------------
def check_run(overrides: list[str], deep: bool = True) -> str:
    """Validate one run's config; with ``deep`` also its data, model and stage plan. Returns the
    plan as text, raises TunelabError with the first problem."""
    from tunelab.preflight import check_required_groups

    check_required_groups(overrides)
    cfg = compose_run(overrides)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    check_targets(cfg.hydra.get("callbacks"), "hydra.callbacks")
    picked = ", ".join(f"{g}={c}" for g, c in sorted(choices.items()) if c and not g.startswith("hydra"))
    with as_hydra_job(cfg):  # ${hydra:...} in paths resolves as in a real run
        validate(cfg, choices)
        if not deep:
            return f"config valid: {picked}"
        from tunelab.build import plan_parts

        return f"{picked}\n{plan_parts(cfg)}"


@contextmanager
def as_hydra_job(cfg: DictConfig) -> Iterator[DictConfig]:
    """``cfg`` without its ``hydra`` node, with Hydra's job state set from it as a real run would
    have it, and the previous state back afterwards: a check or a notebook fit() must not leave
    its choices (or a sweep's mode) to the next run in this process."""
    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.instance()
    previous = hydra.cfg
    hydra.set_config(cfg)
    with open_dict(cfg):
        cfg.pop("hydra")
    try:
        yield cfg
    finally:
        hydra.cfg = previous


def check_command(argv: list[str], deep: bool = True) -> str:
    """``tunelab-train [-m] overrides...`` checked without running: every run it would start."""
    overrides = [a for a in argv if a not in FLAGS]
    runs, note = combinations(overrides)
    if len(runs) == 1:
        return check_run(runs[0], deep)
    reports = []
    for i, run in enumerate(runs):
        try:
            check_run(run, deep)
        except TunelabError as err:
            swept = " ".join(o for o in run if o not in overrides)
            raise TunelabError(f"sweep job {i} ({swept}): {err}") from None
        reports.append(f"  job {i}: ok  {' '.join(o for o in run if o not in overrides)}")
    return "\n".join([f"{len(runs)} sweep jobs valid{note}:", *reports])


def main_check(argv: list[str]) -> int:
    """The ``--check`` flag of tunelab-train: print the plan, exit 0; or one line, exit 2."""
    import sys

    try:
        print(check_command(argv))
    except TunelabError as err:
        print(f"tunelab-train: error: {err}", file=sys.stderr)
        return 2
    print("check passed: nothing was run or written")
    return 0

