"""tunelab from Python (a notebook, a script): the same runs as ``tunelab-train``, by overrides.

    import tunelab
    print(tunelab.check(["strategy=gradual", "debug=smoke"]))   # the plan, or TunelabError
    result = tunelab.fit(["model=resnet18", "debug=smoke"])      # trains, logs to MLflow
    result.run_id, result.metrics["test/acc"]

A sweep (``-m``, ``hparams_search``) needs Hydra's launcher: run it with ``tunelab-train -m``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from tunelab.config.compose import as_hydra_job, compose_run
from tunelab.engine.plan import check_command
from tunelab.errors import TunelabError


def check(overrides: Sequence[str] = (), deep: bool = True) -> str:
    """What ``tunelab-train --check`` prints for these overrides; raises TunelabError instead of exiting."""
    return check_command(list(overrides), deep=deep)


def fit(overrides: Sequence[str] = ()):
    """Train one run as ``tunelab-train *overrides`` would, in this process; returns its
    ``RunResult`` (``run_id``, ``metrics``, ``tracking_uri``, ``output_dir``)."""
    from hydra.types import RunMode

    from tunelab.cli.train import run_job
    from tunelab.config.preflight import check_writable
    from tunelab.umask import private_files

    with private_files():  # the run's files are private, as with tunelab-train (tunelab/umask.py)
        cfg = compose_run(list(overrides))
        if cfg.hydra.mode == RunMode.MULTIRUN:
            raise TunelabError("these overrides start a sweep (hydra.mode=MULTIRUN); run it with tunelab-train -m.")
        folder = Path(str(OmegaConf.select(cfg, "hydra.run.dir")))
        check_writable(folder, "hydra.run.dir")
        with open_dict(cfg):  # what Hydra's own run sets: the job folder every output goes to
            cfg.hydra.runtime.output_dir = str(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not logging.getLogger().handlers:  # a notebook: show tunelab's progress lines
            logging.basicConfig(level=logging.INFO, format="%(message)s")
        with as_hydra_job(cfg):
            return run_job(cfg)
