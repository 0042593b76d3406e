"""A Hydra sweeper that drives an Optuna study (ask, launch a batch of jobs, tell).

Unlike the official hydra-optuna-sweeper (optuna < 3, no pruning), each trial's job reports
its per-epoch validation metric to the study, so pruners can stop bad trials early; the study
lives in a file, so re-running the same command continues it.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("tunelab")
TRIAL_OVERRIDE = "+hydra.job.env_set.TUNELAB_OPTUNA_TRIAL"  # see tunelab.tracking.sweep_job.TRIAL_ENV


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
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

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

        from hydra_plugins.tunelab_optuna_sweeper.study import open_study

        space, fixed = self._search_space(arguments)
        if not space:
            raise ValueError("the Optuna sweeper has nothing to search: set hydra.sweeper.params "
                             "(e.g. in conf/hparams_search/) or pass key=interval(a,b) / key=a,b with -m")
        self._check_choices(space, fixed)
        study = open_study(self.storage, self.study_name, self.direction, self.sampler_node, self.pruner_node)
        stale = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
        for t in stale:  # left RUNNING by an interrupted sweep: they will never report
            study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        # Interrupted trials do not count towards n_trials: the rerun replaces them.
        done = [t for t in study.get_trials(deepcopy=False)
                if t.state.is_finished() and not t.user_attrs.get("interrupted")]
        if done:
            log.info("optuna: resuming study %r (%s): %d of %d trials already done%s", self.study_name, self.storage,
                     len(done), self.n_trials, f", {len(stale)} interrupted trials marked FAIL" if stale else "")
        else:
            log.info("optuna: study %r in %s, %d trials, searching %s", self.study_name, self.storage,
                     self.n_trials, ", ".join(space))
        remaining = self.n_trials - len(done)
        job_index = len(study.get_trials(deepcopy=False))
        returns = []
        while remaining > 0:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, remaining))]
            batch = [fixed + [f"{k}={v}" for k, v in t.params.items()] + [f"{TRIAL_OVERRIDE}={t.number}"] for t in trials]
            try:
                results = self.launcher.launch(batch, initial_job_idx=job_index)
            except BaseException:  # the launcher itself failed (Ctrl+C, a dead cluster): close the batch
                for trial in trials:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            for trial, result in zip(trials, results):
                self._tell(study, trial, result)
            returns.append(results)
            job_index += len(trials)
            remaining -= len(trials)
        self._log_best(study)
        return returns

    def _tell(self, study, trial, result) -> None:
        import optuna

        from tunelab.errors import TrialPruned

        State = optuna.trial.TrialState
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
