"""Hydra's own settings a config file may not decide: what runs, what the environment is,
where files are written.

Hydra acts on ``hydra.*`` before any tunelab code runs: it sets ``hydra.job.env_set`` in the
environment, configures logging handlers from ``hydra.job_logging`` (a ``FileHandler`` writes
to any path; a ``()`` factory calls any function), builds the launcher, sweeper and callbacks,
and runs a launcher's ``setup`` shell lines. So the composed ``hydra`` node is judged here,
before Hydra starts, by the same rule as ``_target_``: a config chooses among what tunelab
ships; the user's command line and environment decide the rest.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tunelab.config import check_targets
from tunelab.config.root import conf_dir
from tunelab.config.targets import shipped_targets
from tunelab.errors import TunelabError

# Launcher/sweeper settings that run shell or Python code, or install packages: a config file
# may leave them at their shipped defaults (empty); only the command line sets them.
RUNS_CODE = frozenset({"setup", "srun_args", "additional_parameters", "runtime_env", "setup_commands",
                       "pip", "conda", "py_modules", "working_dir", "py_executable", "python"})
# Settings that name where files are written: inside the user's outputs unless the command line says.
WRITES_TO = ("hydra.run.dir", "hydra.sweep.dir", "hydra.launcher.submitit_folder", "hydra.sweeper.storage")
LOG_STREAMS = frozenset({"ext://sys.stdout", "ext://sys.stderr"})
LOG_FILE_ROOTS = ("${hydra.runtime.output_dir}/", "${hydra:runtime.output_dir}/")


def check_hydra(cfg: DictConfig, command_line: Iterable[str] = ()) -> None:
    """Raise TunelabError for the first ``hydra.*`` setting a config file may not make.
    ``cfg`` is composed with ``return_hydra_config=True``; ``command_line`` are the user's
    overrides (what they typed is theirs to decide)."""
    hydra = cfg.get("hydra")
    if hydra is None:
        return
    typed = {o.lstrip("+~").partition("=")[0] for o in command_line}
    _check_environment(hydra)
    for name in ("job_logging", "hydra_logging"):
        _check_logging(hydra.get(name), f"hydra.{name}")
    _check_plugins(hydra)
    _check_code_settings(hydra, typed)
    _check_output_folders(cfg, typed)


# -- the environment -----------------------------------------------------------------------------
ENV_MAPPINGS = ("env_set", "env_vars")  # Hydra's job.env_set; a launcher's runtime_env.env_vars


@functools.lru_cache(maxsize=4)
def _shipped_env(conf: Path) -> dict[tuple[str, str], Any]:
    """(mapping, variable) -> the value tunelab's own files give it (the Ray launcher passes the
    sweep's parent run and store to its workers)."""
    shipped = {}
    for file in (conf / "hydra").rglob("*.yaml"):
        for path, node in walk_config(OmegaConf.load(file)):
            if path.rsplit(".", 1)[-1] in ENV_MAPPINGS and isinstance(node, DictConfig):
                shipped |= {(path.rsplit(".", 1)[-1], str(k)): node._get_node(k)._value() for k in node}
    return shipped


def _check_environment(hydra: DictConfig) -> None:
    shipped = _shipped_env(conf_dir())
    for path, node in walk_config(hydra, "hydra"):
        mapping = path.rsplit(".", 1)[-1]
        if mapping not in ENV_MAPPINGS or not isinstance(node, DictConfig):
            continue
        for key in map(str, node):
            if shipped.get((mapping, key), _NOT_SHIPPED) != node._get_node(key)._value():
                raise TunelabError(f"{path}.{key}: a config may not set environment variables (they decide "
                                   f"what tunelab trusts and where it logs); set {key} in your shell instead.")


_NOT_SHIPPED = object()


# -- logging: dictConfig can call any factory and write any file -----------------------------------
@functools.lru_cache(maxsize=1)
def _shipped_logging_classes() -> frozenset[str]:
    """``class`` values of the logging configs tunelab and Hydra ship (handlers, formatters)."""
    import hydra


    files = [*(Path(hydra.__file__).parent / "conf" / "hydra").glob("*_logging/*.yaml"), conf_dir() / "hydra" / "default.yaml"]
    return frozenset(str(node) for f in files for path, node in walk_config(OmegaConf.load(f)) if path.endswith(".class"))


def _check_logging(node: Any, where: str) -> None:
    if not isinstance(node, DictConfig):
        return
    classes = _shipped_logging_classes()
    for path, value in walk_config(node, where):
        key = path.rsplit(".", 1)[-1]
        if key == "()":
            raise TunelabError(f"{path}: a logging factory ('()') calls any function; tunelab's logging "
                               "configs may not use one.")
        if key == "class" and str(value) not in classes:
            raise TunelabError(f"{path}={value!r}: logging classes are limited to {', '.join(sorted(classes))}.")
        if key == "stream" and str(value) not in LOG_STREAMS:
            raise TunelabError(f"{path}={value!r}: a log stream is ext://sys.stdout or ext://sys.stderr.")
        if key == "filename" and not _inside_job_folder(_raw(node, path[len(where) + 1:])):
            raise TunelabError(f"{path}: a log file must be written inside the job's output folder "
                               f"({LOG_FILE_ROOTS[0]}<name>.log).")
        if isinstance(value, str) and value.startswith("ext://") and key != "stream":
            raise TunelabError(f"{path}={value!r}: a logging config may not import objects (ext://).")


def _inside_job_folder(filename: str) -> bool:
    rest = next((filename[len(r):] for r in LOG_FILE_ROOTS if filename.startswith(r)), None)
    return rest is not None and ".." not in rest and rest.replace("${hydra.job.name}", "job").count("${") == 0


# -- launchers, sweepers, callbacks -------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _plugin_targets() -> frozenset[str]:
    """The launchers and sweepers installed Hydra plugins register, and tunelab's own files name."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins


    Plugins.instance()  # discovers hydra_plugins.*, which register their configs
    repo = ConfigStore.instance().repo.get("hydra", {})
    found = set()
    for group in ("launcher", "sweeper"):
        for entry in repo.get(group, {}).values():
            target = OmegaConf.select(entry.node, "_target_") if hasattr(entry, "node") else None
            if target:
                found.add(str(target))
        found |= shipped_targets(conf_dir() / "hydra" / group) if (conf_dir() / "hydra" / group).is_dir() else set()
    return frozenset(found)


def _check_plugins(hydra: DictConfig) -> None:
    for group in ("launcher", "sweeper"):
        node = hydra.get(group)
        if not isinstance(node, DictConfig):
            continue
        target = node._get_node("_target_")._value() if "_target_" in node else None
        if target is not None and str(target) not in _plugin_targets():
            raise TunelabError(f"hydra.{group}._target_={target!r} is not an installed Hydra {group}; pick one with "
                               f"hydra/{group}=<choice> ({', '.join(sorted(_plugin_targets()))}).")
        for key in node:  # nested nodes Hydra's plugins may build (samplers...): tunelab's allow-list
            if str(key) != "_target_":
                check_targets(node._get_node(key), f"hydra.{group}.{key}")
    check_targets(hydra.get("callbacks"), "hydra.callbacks")


def _check_code_settings(hydra: DictConfig, typed: set[str]) -> None:
    for group in ("launcher", "sweeper"):
        for path, value in walk_config(hydra.get(group), f"hydra.{group}"):
            key = path.rsplit(".", 1)[-1]
            if key not in RUNS_CODE or path in typed or _empty(value):
                continue
            if key == "runtime_env" and isinstance(value, DictConfig) and set(map(str, value)) <= {"env_vars"}:
                continue  # environment variables: judged by _check_environment
            raise TunelabError(f"{path} runs commands on the cluster; a config file may not set it. "
                               f"If you mean it, give it on the command line: {path}=...")


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (DictConfig, ListConfig, str)) and len(value) == 0)


# -- where Hydra writes ----------------------------------------------------------------------------------
def _check_output_folders(cfg: DictConfig, typed: set[str]) -> None:
    """Hydra creates these folders and writes ``.hydra/*.yaml`` and the job log into them."""
    if typed & {*WRITES_TO, "hydra.sweep.subdir", "hydra.job.name", "hydra.output_subdir"} or any(k.startswith("paths.") for k in typed):
        return  # the user chose where their outputs go
    job_name = cfg.hydra.job.get("name")
    if job_name is not None and ("/" in str(job_name) or str(job_name).startswith(".")):
        raise TunelabError(f"hydra.job.name={job_name!r} must be a plain name (it names the job's log file).")
    root = Path(os.environ.get("TUNELAB_HOME") or ".").resolve()  # as paths/default.yaml, but never from a config
    for key in (*WRITES_TO, "hydra.output_subdir", "hydra.sweep.subdir"):
        raw = _raw(cfg, key)
        if raw is None:
            continue
        folder = _resolve_folder(cfg, key, root)
        if folder is not None and not folder.is_relative_to(root):
            raise TunelabError(f"{key} resolves to {folder}, outside this run's outputs under {root}; a config file "
                               f"may not choose it. Give {key}=... on the command line if you mean it.")


def _resolve_folder(cfg: DictConfig, key: str, root: Path) -> Path | None:
    try:
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001 - ${hydra:job.num} & co. resolve only inside the job
        value = _raw(cfg, key)
    if value is None:
        return None
    text = str(value)
    if key == "hydra.sweeper.storage":  # an Optuna journal file or SQLite store; a database server is elsewhere
        if "://" in text and not text.startswith("sqlite:///"):
            return None
        text = text.removeprefix("sqlite:///")
    if key in ("hydra.output_subdir", "hydra.sweep.subdir"):  # relative to the run's folder
        return (root / "outputs" / "x" / text).resolve() if not Path(text).is_absolute() else Path(text).resolve()
    return Path(text).resolve() if "${" not in text else None


# -- helpers -------------------------------------------------------------------------------------------------
def walk_config(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted path, value) below ``node``, unresolved where a value is an interpolation."""
    if isinstance(node, (DictConfig, ListConfig)) and (node._is_none() or node._is_missing() or node._is_interpolation()):
        return
    if isinstance(node, DictConfig):
        for key in node:
            child = node._get_node(key)
            sub = f"{path}.{key}" if path else str(key)
            value = child if isinstance(child, (DictConfig, ListConfig)) else child._value()
            yield sub, value
            yield from walk_config(child, sub)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            child = node._get_node(i)
            value = child if isinstance(child, (DictConfig, ListConfig)) else child._value()
            yield f"{path}[{i}]", value
            yield from walk_config(child, f"{path}[{i}]")


def _raw(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node._get_node(part)
    return node._value() if node is not None and not isinstance(node, (DictConfig, ListConfig)) else node


def guard_hydra_callbacks(refuse) -> None:
    """Hydra builds ``hydra.callbacks`` itself, before any tunelab code runs, and a config file
    may add some: hold them to tunelab's allow-list too. ``refuse(err)`` ends the command.
    Hydra has no hook before it builds them, so its (private) Callbacks constructor is wrapped."""
    from hydra._internal import callbacks as hydra_callbacks


    original = hydra_callbacks.Callbacks.__init__
    if getattr(original, "tunelab_guarded", False):
        return

    def guarded(self, config=None) -> None:
        if config is not None and OmegaConf.select(config, "hydra.callbacks"):
            try:
                check_targets(config.hydra.callbacks, "hydra.callbacks")
            except TunelabError as err:
                refuse(err)
        original(self, config)

    guarded.tunelab_guarded = True
    hydra_callbacks.Callbacks.__init__ = guarded
