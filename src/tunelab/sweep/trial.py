"""What a sweep trial does inside its job: report to Optuna, and share the machine fairly."""

from __future__ import annotations

import fcntl
import logging
import math
import os
from pathlib import Path

import lightning as L

from tunelab.errors import TrialPruned
from tunelab.tracking.sweep_job import Job

log = logging.getLogger("tunelab")


class OptunaPruning(L.Callback):
    """Report the objective after each validation epoch; stop the trial when Optuna says so."""

    def __init__(self, trial, monitor: str):
        self.trial = trial
        self.monitor = monitor

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        epoch = trainer.current_epoch
        if not math.isfinite(value):
            return  # a NaN is the run's failure to report, not the pruner's
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise TrialPruned(f"trial {self.trial.number} pruned at epoch {epoch}: {self.monitor}={value:.4f}")


def optuna_trial(job: Job):
    """The job's Optuna trial, loaded from the study's storage (shared by every process)."""
    from hydra.core.hydra_config import HydraConfig

    from hydra_plugins.tunelab_optuna_sweeper.study import open_study

    from omegaconf import OmegaConf

    sweeper = HydraConfig.get().sweeper
    # The pruner lives on the study object, not in the storage: build the sweeper's own.
    study = open_study(str(sweeper.storage), str(sweeper.study_name), str(sweeper.direction),
                       OmegaConf.to_container(sweeper.sampler, resolve=True),
                       OmegaConf.to_container(sweeper.pruner, resolve=True))
    trial_id = next(t._trial_id for t in study.get_trials(deepcopy=False) if t.number == job.trial)
    import optuna

    return optuna.trial.Trial(study, trial_id)


_held_slot = None  # the open lock file that reserves this process's slot


def claim_slot(job: Job, gpus: int) -> int:
    """Reserve one of ``job.n_parallel`` slots for this process, with a file lock in the sweep dir.

    Jobs finish out of order, so ``job.num % n`` would put two live jobs on one GPU; a lock
    held for the worker's lifetime cannot. Returns the slot index (== the GPU to use).
    """
    global _held_slot
    if _held_slot is not None:
        return int(Path(_held_slot.name).stem.rsplit("-", 1)[-1])
    folder = Path(job.sweep_dir) / ".slots"
    folder.mkdir(parents=True, exist_ok=True)
    count = max(job.n_parallel, gpus, 1)
    for index in range(count):
        handle = open(folder / f"slot-{index}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _held_slot = handle
        return index
    return job.num % count  # more workers than slots: share, but spread


def share_machine(job: Job, cfg) -> None:
    """Parallel trials on one machine: one GPU each when there are GPUs, else split the cores."""
    import torch

    if job.n_parallel <= 1:
        return
    gpus = torch.cuda.device_count()
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if gpus and accelerator in ("auto", "gpu", "cuda"):
        slot = claim_slot(job, gpus)
        cfg.trainer.devices = [slot % gpus]
        log.info("sweep: job %d runs on GPU %d (%d parallel jobs, %d GPUs)", job.num, slot % gpus, job.n_parallel, gpus)
        return
    threads = max(1, (os.cpu_count() or 1) // job.n_parallel)
    torch.set_num_threads(threads)
    log.info("sweep: job %d uses %d CPU threads (%d parallel jobs)", job.num, threads, job.n_parallel)
