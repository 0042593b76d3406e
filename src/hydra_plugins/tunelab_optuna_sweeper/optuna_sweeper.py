"""A Hydra sweeper that drives an Optuna study (ask, launch a batch of jobs, tell).

Unlike the official hydra-optuna-sweeper (optuna < 3, no pruning), each trial's job reports
its per-epoch validation metric to the study, so pruners can stop bad trials early; the study
lives in a file, so re-running the same command continues it. In a database
(``hydra.sweeper.storage=postgresql://...``) several machines work on one study at once: each
runs trials until the study holds ``n_trials`` of them (study.py: who runs which trial).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger("tunelab")
TRIAL_OVERRIDE = "+hydra.job.env_set.TUNELAB_OPTUNA_TRIAL"  # see tunelab.tracking.sweep_job.TRIAL_ENV
STORAGE_ENV = "TUNELAB_OPTUNA_STORAGE"  # a storage URL with a password, for the jobs (see _hide_password)


class OptunaSweeper(Sweeper):
    def __init__(self, study_name: str, storage: str, direction: str = "max", n_trials: int = 20,
                 n_jobs: int = 1, sampler: Any = None, pruner: Any = None, params: Any = None) -> None:
        self.study_name = study_name
        self.storage = storage
        self.direction = direction
        self.n_trials = int(n_trials)
        self.n_jobs = max(1, int(n_jobs))
        self.sampler_node = _plain(sampler)
        self.pruner_node = _plain(pruner)
        self.params = _plain(params) or {}
        self.launcher = None
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self._hide_password(config)
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def _hide_password(self, config: DictConfig) -> None:
        """Hydra writes the sweep's config (multirun.yaml) and each job's (.hydra/hydra.yaml),
        composed again from the command line: a storage URL typed with its password would be in
        every job folder. So the URL reaches the jobs through this process's environment, which
        every launcher's jobs inherit (Ray's workers: through its runtime_env, as the parent run's
        id), and the files say ``${oc.env:TUNELAB_OPTUNA_STORAGE}``."""
        from tunelab.tracking.links import shown_uri

        if shown_uri(self.storage) == self.storage:
            return
        os.environ[STORAGE_ENV] = self.storage
        hidden = "${oc.env:%s}" % STORAGE_ENV
        with read_write(config), open_dict(config):
            others = [o for o in config.hydra.overrides.hydra if o.lstrip("+~").partition("=")[0] != "hydra.sweeper.storage"]
            config.hydra.overrides.hydra = [*others, f"hydra.sweeper.storage={hidden}"]
            config.hydra.sweeper.storage = hidden
            ray_env = OmegaConf.select(config, "hydra.launcher.ray.runtime_env.env_vars")
            if isinstance(ray_env, DictConfig):  # read when the launcher is built, right after this
                ray_env[STORAGE_ENV] = hidden

    def _search_space(self, arguments: list[str]) -> tuple[dict, list[str]]:
        from hydra_plugins.tunelab_optuna_sweeper.study import distribution

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        configured = [f"{k}={v}" for k, v in self.params.items()]
        space, fixed = {}, {}
        for override in parser.parse_overrides(configured) + parser.parse_overrides(arguments):
            key = override.get_key_element()  # the command line wins over the config file
            space.pop(key, None), fixed.pop(key, None)
            if override.is_sweep_override():
                space[key] = distribution(override)
            else:
                fixed[key] = f"{key}={override.get_value_element_as_str()}"
        return space, list(fixed.values())

    def _check_choices(self, space: dict, fixed: list[str]) -> None:
        """Compose each categorical choice once, so a typo fails now, not at trial 17."""
        from optuna.distributions import CategoricalDistribution

        batch = [fixed + [f"{k}={c}"] for k, d in space.items() if isinstance(d, CategoricalDistribution) for c in d.choices]
        if batch:
            self.validate_batch_is_legal(batch)

    def sweep(self, arguments: list[str]) -> Any:
        import optuna

        from hydra_plugins.tunelab_optuna_sweeper.study import counts, fail_stale, heartbeat, open_study
        from tunelab.tracking.links import shown_uri

        space, fixed = self._search_space(arguments)
        if not space:
            raise ValueError("the Optuna sweeper has nothing to search: set hydra.sweeper.params "
                             "(e.g. in conf/hparams_search/) or pass key=interval(a,b) / key=a,b with -m")
        self._check_choices(space, fixed)
        study = open_study(self.storage, self.study_name, self.direction, self.sampler_node, self.pruner_node)
        stale = fail_stale(study)  # left RUNNING by an interrupted sweep: they will never report
        trials = study.get_trials(deepcopy=False)
        # Interrupted trials do not count towards n_trials: the rerun replaces them.
        done = [t for t in trials if t.state.is_finished() and counts(t)]
        elsewhere = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and counts(t)]
        where = shown_uri(self.storage)
        if done or elsewhere:
            log.info("optuna: resuming study %r (%s): %d of %d trials already done%s%s", self.study_name, where,
                     len(done), self.n_trials, f", {len(elsewhere)} running in other sweeps" if elsewhere else "",
                     f", {len(stale)} interrupted trials marked FAIL" if stale else "")
        else:
            log.info("optuna: study %r in %s, %d trials, searching %s", self.study_name, where,
                     self.n_trials, ", ".join(space))
        returns = []
        while trials := self._ask(study, space):
            batch = [fixed + [f"{k}={v}" for k, v in t.params.items()] + [f"{TRIAL_OVERRIDE}={t.number}"] for t in trials]
            try:
                with heartbeat(study, trials):  # other sweeps of the study see these trials alive
                    # the trial number names the job's folder: unique, also with other sweeps asking between
                    results = self.launcher.launch(batch, initial_job_idx=trials[0].number)
            except BaseException:  # the launcher itself failed (Ctrl+C, a dead cluster): close the batch
                for trial in trials:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
                raise
            for trial, result in zip(trials, results):
                self._tell(study, trial, result)
            returns.append(results)
        self._log_best(study)
        return returns

    def _ask(self, study, space: dict) -> list:
        """The next batch: as many trials as the study still lacks, counted over every sweep
        process that shares it (Optuna's MaxTrialsCallback counts the same way), so each process
        stops when the study holds n_trials finished or live trials. [] when it does."""
        from hydra_plugins.tunelab_optuna_sweeper.study import claim, counts, drop_surplus, fail_stale

        while True:
            fail_stale(study)  # a trial of a sweep that died meanwhile frees its slot
            free = self.n_trials - sum(map(counts, study.get_trials(deepcopy=False)))
            if free <= 0:
                return []
            asked = [study.ask(space) for _ in range(min(self.n_jobs, free))]
            for trial in asked:
                claim(study, trial)
            kept = drop_surplus(study, asked, self.n_trials)
            if kept:
                return kept

    def _tell(self, study, trial, result) -> None:
        import optuna

        from tunelab.errors import TrialPruned

        State = optuna.trial.TrialState
        if study._storage.get_trial(trial._trial_id).state.is_finished():
            log.warning("optuna: trial %d was already marked finished by another sweep; its result is not recorded",
                        trial.number)
            return
        if result.status == JobStatus.COMPLETED:
            value = result.return_value
            if value is None or not math.isfinite(float(value)):
                log.warning("optuna: trial %d returned %r for the objective; marked FAIL", trial.number, value)
                study.tell(trial, state=State.FAIL)
            else:
                study.tell(trial, float(value))
            return
        error = result._return_value
        if isinstance(error, TrialPruned):
            study.tell(trial, state=State.PRUNED)
            log.info("optuna: %s", error)
        else:
            study.tell(trial, state=State.FAIL)
            log.warning("optuna: trial %d failed (%s: %s); the sweep goes on", trial.number, type(error).__name__, error)

    def _log_best(self, study) -> None:
        import optuna

        complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        if complete:
            best = study.best_trial
            log.info("optuna: best trial %d: value %.4f with %s", best.number, best.value, best.params)
        else:
            log.warning("optuna: no trial completed in study %r", self.study_name)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
