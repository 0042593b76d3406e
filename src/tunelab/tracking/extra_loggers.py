"""Lightning loggers beside MLflow: ``logger=tensorboard``, ``logger=csv``, ``logger=all``.

MLflow stays the record of runs and sweeps. ``logger.extra`` names further Lightning loggers
(conf/logger/tensorboard.yaml): Lightning sends them every metric the module logs, as it does
MLflow, and they get the params the MLflow run gets as their hyperparameters. They are built on
rank 0 only (the other ranks open no run, runs.NoRun) and write only inside the job's output
folder, so the jobs of a sweep never share one. Which loggers a config may build is the
allow-list's call (tunelab.config.targets): the ones tunelab's conf/ names.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from tunelab.config import build
from tunelab.config.redaction import redact_value
from tunelab.config.settings import shown
from tunelab.errors import TunelabError


def extra_loggers(cfg: DictConfig) -> list:
    """The loggers ``logger.extra`` names, built and checked (before the MLflow run opens: a bad
    one is refused with no run left behind). A null entry turns one off."""
    extra = cfg.logger.get("extra")
    if extra is None:
        return []
    if not isinstance(extra, DictConfig):
        raise TunelabError(f"logger.extra must be a mapping of names to logger nodes, got {shown(extra)}.")
    output = Path(str(cfg.paths.output_dir)).resolve()
    built = []
    for name in map(str, extra):
        node, key = extra[name], f"logger.extra.{name}"
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise TunelabError(f"{key} must be a logger node with a _target_ (as in conf/logger/tensorboard.yaml), "
                               f"got {shown(node)}.")
        logger = _build(node, key)
        _check_inside(logger, key, output)
        built.append(logger)
    return built


def _build(node: DictConfig, key: str):
    try:
        return build(node, key)
    except TunelabError as err:
        cause = err.__cause__.__cause__ if err.__cause__ is not None else None
        if isinstance(cause, ModuleNotFoundError):  # TensorBoardLogger without tensorboard installed
            reason = str(cause).splitlines()[0]
            raise TunelabError(f"{key} ({node._target_}) needs a package that is not installed: {reason} "
                               "Install tensorboard (scripts/setup.sh does), or choose logger=csv.") from None
        raise


def _check_inside(logger, key: str, output: Path) -> None:
    """A config does not choose where files are written outside the job's outputs (save_dir,
    name and version all reach the path, so the logger's own folder is what is judged)."""
    folder = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
    where = Path(str(folder)).resolve() if folder else None
    if where is None or not where.is_relative_to(output):
        raise TunelabError(f"{key} would write to {where}, outside the job's output folder {output}; "
                           "keep its save_dir at ${paths.output_dir} (or a folder under it).")


def log_hyperparams(loggers: list, params: dict[str, str]) -> None:
    """The MLflow run's params, as each extra logger's hyperparameters (hparams.yaml beside its
    metrics); values read from the environment are withheld, as they are from MLflow."""
    shared = {k: redact_value(v) for k, v in params.items()}
    for logger in loggers:
        logger.log_hyperparams(shared)
