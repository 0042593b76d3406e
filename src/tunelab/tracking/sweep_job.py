"""What a training job knows about the sweep it belongs to (nothing, for a single run)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# The sweep's parent run id travels to every job (in-process, joblib, submitit) through the
# environment: the Hydra callback sets it before the first job is launched.
PARENT_ENV = "TUNELAB_PARENT_RUN_ID"
TRIAL_ENV = "TUNELAB_OPTUNA_TRIAL"  # set per job by tunelab's Optuna sweeper (hydra.job.env_set)
SWEPT_ENV = "TUNELAB_SWEPT_KEYS"  # the keys the sweep varies, comma-separated (set with PARENT_ENV)


@dataclass
class Job:
    num: int
    overrides: dict[str, str]  # key -> value as typed: the trial's hyperparameters
    sweep_dir: str
    launcher: str  # the launcher's class name, e.g. JoblibLauncher
    n_parallel: int  # how many jobs may run at once on this machine
    parent_run_id: str | None = None
    trial: int | None = None  # the Optuna trial number, under tunelab's Optuna sweeper
    choices: dict[str, str] = field(default_factory=dict)
    swept: list[str] = field(default_factory=list)  # the keys the sweep varies (empty: unknown)


def override_items(overrides: list[str]) -> dict[str, str]:
    """``['optimizer.lr=1e-3', '+x=1', 'strategy=full']`` -> ``{'optimizer.lr': '1e-3', ...}``."""
    items = {}
    for text in overrides:
        key, _, value = str(text).partition("=")
        items[key.lstrip("+~")] = value
    return items


def current_job() -> Job | None:
    """The running Hydra multirun job, or None (a single run, or no Hydra at all)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    launcher = str(hc.launcher.get("_target_", "")).rsplit(".", 1)[-1]
    cpus = os.cpu_count() or 1
    n_jobs = hc.launcher.get("n_jobs")  # joblib
    if launcher == "LocalLauncher":  # submitit_local runs every job of the array at once
        n_jobs = min(int(hc.launcher.get("array_parallelism") or cpus), cpus)
    if n_jobs is None or int(n_jobs) < 1:  # in-process launchers run one job at a time; -1 = all CPUs
        n_jobs = 1 if n_jobs is None else cpus
    trial = os.environ.get(TRIAL_ENV)
    return Job(
        num=int(hc.job.num),
        overrides=override_items(list(hc.overrides.task)),
        sweep_dir=str(hc.sweep.dir),
        launcher=launcher,
        n_parallel=int(n_jobs),
        parent_run_id=os.environ.get(PARENT_ENV) or None,
        trial=int(trial) if trial else None,
        choices={str(k): str(v) for k, v in hc.runtime.choices.items() if v is not None},
        swept=[k for k in os.environ.get(SWEPT_ENV, "").split(",") if k],
    )


def run_name(job: Job) -> str:
    """``#3 optimizer.lr=1e-3 strategy=full``: what the UI's run list shows for a trial. Only the
    swept keys when known: ``debug=smoke``, the same for every trial, would hide what differs."""
    label = f"trial {job.trial}" if job.trial is not None else f"#{job.num}"
    items = {k: v for k, v in job.overrides.items() if not k.startswith("hydra.")}
    varied = {k: v for k, v in items.items() if k in job.swept}
    shown = " ".join(f"{k}={v}" for k, v in (varied or items).items())
    return f"{label} {shown}".strip()[:250]
