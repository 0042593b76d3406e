"""``tunelab-train --check`` and ``tunelab.check()``: everything a run validates before it starts,
without the run.

Composes the command's config (every combination of a sweep, every categorical combination of
an Optuna search), runs the same checks ``train()`` runs, and with ``deep`` also reads the data
labels, builds the model and plans the stages against the budget. Nothing is written: no run,
no output folder, no checkpoint.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tunelab.config import build, check_targets, conf_dir
from tunelab.config.compose import as_hydra_job, combinations, command_overrides, compose_run
from tunelab.config.hydra_guard import check_hydra, walk_config
from tunelab.config.preflight import check_required_groups
from tunelab.config.settings import READERS, extension_points
from tunelab.engine.build import plan_parts
from tunelab.engine.module import FineTuneModule
from tunelab.engine.validation import check_config
from tunelab.errors import TunelabError
from tunelab.tracking.extra_loggers import extra_loggers


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
def known_settings(root: Path) -> tuple[frozenset[str], dict[str, frozenset[str]]]:
    """(top-level settings, the keys tunelab's own files give each top-level mapping), read once
    per config tree: a sweep's --check and every run ask for each of its jobs."""
    def plain(file: Path) -> dict:  # unresolved: ${data.objective} & co. need the whole config
        return OmegaConf.to_container(OmegaConf.load(file), resolve=False) or {}

    train = plain(root / "train.yaml")
    top = (set(train) - {"defaults"}) | ({p.name for p in root.iterdir() if p.is_dir()} - global_groups(root))
    below: dict[str, set[str]] = {k: set(v) for k, v in train.items() if isinstance(v, dict)}
    for folder in (p for p in root.iterdir() if p.is_dir() and p.name != "hydra"):
        for file in folder.glob("*.yaml"):
            node = plain(file)
            if "@package _global_" in file.read_text()[:300]:
                for key, value in node.items():
                    if isinstance(value, dict):
                        below.setdefault(key, set()).update(map(str, value))
            else:
                below.setdefault(folder.name, set()).update(str(k) for k in node if k != "defaults")
    return frozenset(top), {k: frozenset(v) for k, v in below.items()}


def check_known_keys(cfg: DictConfig, choices: dict | None = None) -> None:
    """Every key is one tunelab reads: at the top level, one train.yaml declares or a config
    group's; one level down, in settings without a ``_target_`` (logger, paths, perf...), one
    tunelab's own files give them. ``_target_`` nodes are checked against their signature
    (``check_settings``). Anything else (``+seeed=3``, a misplaced ``@package``, ``optimiser:``
    in an experiment file) would compose and then be silently ignored."""
    top, below = known_settings(conf_dir())
    top = top | set(extension_points(FineTuneModule))  # loss & co.: read when a config gives them
    for key in map(str, cfg):
        if key not in top and not key.startswith("_") and key != "hydra":
            raise TunelabError(f"top-level key '{key}' is not a tunelab setting, so nothing would read it"
                               f"{_source(key, choices)} Top-level settings: {', '.join(sorted(top))}.")
        node = cfg._get_node(key)
        if not isinstance(node, DictConfig) or node._is_none() or "_target_" in node or key not in below:
            continue
        if key in READERS and READERS[key].closed:
            continue  # its reader's signature already refused any key it does not take (check_config)
        if all(isinstance(node._get_node(k), DictConfig) and "_target_" in node._get_node(k) for k in node):
            continue  # a collection of built things (callbacks): the names are the user's
        unknown = sorted(str(k) for k in node if str(k) not in below[key])
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], below[key], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise TunelabError(f"{key}.{unknown[0]} is not a {key} setting{hint}, so nothing would read it"
                               f"{_from_experiment(choices)}. {key} settings: {', '.join(sorted(below[key]))}.")


def _source(key: str, choices: dict | None) -> str:
    if choices and choices.get(key):
        return (f". It comes from {key}={choices[key]}: put '# @package _global_' on the first line "
                f"of conf/{key}/{choices[key]}.yaml (or its copy on hydra.searchpath).")
    return f"{_from_experiment(choices)}."


def _from_experiment(choices: dict | None) -> str:
    """Where a stray key can come from besides the command line: the files written at the top level."""
    picked = [f"{g}={choices[g]}" for g in ("experiment", "hparams_search") if choices and choices.get(g)]
    return f" (from the command line or {' or '.join(picked)})" if picked else ""


def check_no_remote_code(cfg: DictConfig) -> None:
    """``trust_remote_code`` runs a model folder's Python: tunelab never sets it, and no config may."""
    for path, _ in walk_config(cfg):
        if path.rsplit(".", 1)[-1] == "trust_remote_code":
            raise TunelabError(f"{path}: tunelab never runs a model folder's own Python (trust_remote_code); "
                               "use a model transformers implements, saved with save_pretrained.")


def validate(cfg: DictConfig, choices: dict | None = None) -> None:
    """The checks every run makes before anything is read or built (train() and --check)."""
    check_targets(cfg)
    check_no_remote_code(cfg)
    check_config(cfg, _from_experiment(choices))
    check_known_keys(cfg, choices)


# -- one run -----------------------------------------------------------------------------------
def check_run(overrides: list[str], deep: bool = True) -> str:
    """Validate one run's config; with ``deep`` also its data, model and stage plan. Returns the
    plan as text, raises TunelabError with the first problem."""
    check_required_groups(overrides)
    cfg = compose_run(overrides)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    check_hydra(cfg, overrides)
    picked = ", ".join(f"{g}={c}" for g, c in sorted(choices.items()) if c and not g.startswith("hydra"))
    with as_hydra_job(cfg):  # ${hydra:...} in paths resolves as in a real run
        validate(cfg, choices)
        if not deep:
            return f"config valid: {picked}"
        _check_loggers(cfg)
        if cfg.get("tune"):  # the LR finder's own range check (min_lr < max_lr)
            build(cfg.tune, "tune")
        return f"{picked}\n{plan_parts(cfg)}"


def _check_loggers(cfg: DictConfig) -> None:
    """Build the extra loggers (none writes before it logs): a missing package or a folder outside
    the job's outputs is found now. A check has no job folder yet; an unwritten stand-in takes its place."""
    job = cfg.copy()
    if OmegaConf.select(job, "paths.output_dir", throw_on_resolution_failure=False) is None:
        job.paths.output_dir = str(Path(str(job.paths.log_dir)) / "check")
    extra_loggers(job)


def check_command(argv: list[str], deep: bool = True) -> str:
    """``tunelab-train [-m] overrides...`` checked without running: every run it would start."""
    overrides = command_overrides(argv)
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

