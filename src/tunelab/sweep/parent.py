"""The parent MLflow run of a multirun: a Hydra callback in the process that runs the sweeper.

Hydra calls ``on_multirun_start`` before the first job and ``on_multirun_end`` after the
last. Every job (in-process, joblib worker, submitit task) reads the parent's id from the
environment and nests its own run under it, so the MLflow UI groups a sweep. If the sweep
dies between the two calls (a failed job under the basic sweeper raises, Ctrl+C), an atexit
hook still summarises the children and marks the parent FAILED: never a parent left RUNNING.
"""

from __future__ import annotations

import atexit
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tunelab.deploy.registry import register_run_model
from tunelab.sweep import summary
from tunelab.tracking import tag_names
from tunelab.tracking.links import runs_page, save_view, shown_uri, ui_hint
from tunelab.tracking.runs import experiment_id
from tunelab.tracking.store import artifact_location, check_reachable, tracking_uri
from tunelab.tracking.sweep_job import PARENT_ENV, SWEPT_ENV

log = logging.getLogger("tunelab")


PARENT_ATTR = "tunelab.parent_run"  # the study's user attribute naming its parent MLflow run


def study_key(config: DictConfig) -> str | None:
    """A resumable study's identity (tunelab's Optuna sweeper): reruns reuse the parent run.
    Its storage's password, if the URL has one, is not part of it (the key is a tag)."""
    sweeper = config.hydra.sweeper
    if "storage" not in sweeper or not sweeper.get("storage"):
        return None
    return f"{shown_uri(str(sweeper.storage))}::{sweeper.get('study_name')}"


def swept_keys(config: DictConfig) -> list[str]:
    """The keys the sweep varies: command-line sweeps (``optimizer.lr=1e-3,3e-4``) and the
    Optuna sweeper's search space (``hydra.sweeper.params``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [o.key_or_group for o in overrides if o.is_sweep_override()]
    keys += [str(k) for k in (config.hydra.sweeper.get("params") or {})]
    return list(dict.fromkeys(k for k in keys if not k.startswith("hydra.")))


class SweepTracker(Callback):
    def __init__(self) -> None:
        self.run = None
        self.config: DictConfig | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(config)
        check_reachable(uri)
        client = MlflowClient(uri)
        exp_id = experiment_id(client, str(config.logger.experiment_name), artifact_location(config, uri))
        key = study_key(config)
        if key:
            run_id, joined = self._study_parent(client, exp_id, config, key)
        else:
            run_id, joined = self._new_parent(client, exp_id, config, None), False
        if joined:
            self._rejoin(client, exp_id, run_id, config, key)
        save_view(client, exp_id, str(config.objective), default=True)  # before the trials: they find it there
        os.environ[PARENT_ENV] = run_id
        os.environ[SWEPT_ENV] = ",".join(swept_keys(config))
        self.run = (client, exp_id, run_id, uri)
        self.config = config
        atexit.register(self._close, "FAILED")
        log.info("sweep: parent MLflow run %s in %s", run_id, shown_uri(uri))

    def _study_parent(self, client, exp_id: str, config: DictConfig, key: str) -> tuple[str, bool]:
        """The study's one parent run, also when several machines start its sweep at once:
        (run id, True when it existed already).

        Searching MLflow for the study's tag, then creating the run, races: two processes both
        find nothing and both create one, and no MLflow call can make that atomic. The study's
        storage can: exactly one process creates the study (study.made_once), and only that
        one creates the parent run and stores its id in the study; the others read it there.
        A study without that id (made by an older tunelab, whose parent the tag still finds) or
        whose id is not a run of this tracking store falls back to the tag search.
        """
        from hydra_plugins.tunelab_optuna_sweeper.study import made_once, set_study_attr

        sweeper = config.hydra.sweeper
        storage, name = str(sweeper.storage), str(sweeper.study_name)
        run_id, made = made_once(storage, name, str(sweeper.direction), PARENT_ATTR,
                                 lambda: self._new_parent(client, exp_id, config, key))
        if made:
            return run_id, False
        if run_id is not None and self._is_parent(client, run_id, key):
            return run_id, True
        found = client.search_runs([exp_id], f"tags.`{tag_names.STUDY}` = '{key}'", max_results=1,
                                   order_by=["attributes.start_time DESC"])
        run_id, joined = (found[0].info.run_id, True) if found else (self._new_parent(client, exp_id, config, key), False)
        set_study_attr(storage, name, PARENT_ATTR, run_id)
        return run_id, joined

    @staticmethod
    def _is_parent(client, run_id: str, key: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException:  # another tracking store than the one the study was started with
            return False
        return run.info.lifecycle_stage == "active" and run.data.tags.get(tag_names.STUDY) == key

    @staticmethod
    def _new_parent(client, exp_id: str, config: DictConfig, key: str | None) -> str:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        tags = {tag_names.SWEEP: "parent", tag_names.SWEEP_DIR: str(sweep_dir)}
        if key:
            tags[tag_names.STUDY] = key
        run_id = client.create_run(exp_id, run_name=f"sweep {sweep_dir.name}", tags=tags).info.run_id
        sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=False)
        if isinstance(sweeper.get("storage"), str):
            sweeper["storage"] = shown_uri(sweeper["storage"])  # typed with its password, maybe
        launcher = OmegaConf.to_container(config.hydra.launcher, resolve=False)
        overrides = list(config.hydra.overrides.task)
        client.log_param(run_id, "sweep.sweeper", str(sweeper.get("_target_", "")).rsplit(".", 1)[-1])
        client.log_param(run_id, "sweep.launcher", str(launcher.get("_target_", "")).rsplit(".", 1)[-1])
        client.log_param(run_id, "sweep.objective", f"{config.objective} ({config.objective_mode})")
        client.log_text(run_id, OmegaConf.to_yaml({"overrides": overrides, "sweeper": sweeper,
                                                   "launcher": launcher}), "sweep/search_space.yaml")
        return run_id

    @staticmethod
    def _rejoin(client, exp_id: str, run_id: str, config: DictConfig, key: str) -> None:
        """A rerun of the study, or another machine's sweep of it: the parent runs again, and its
        trials left RUNNING by a sweep that died are ended. Not those another sweep still runs."""
        from hydra_plugins.tunelab_optuna_sweeper.study import live_trials

        client.update_run(run_id, status="RUNNING")
        live = live_trials(str(config.hydra.sweeper.storage), str(config.hydra.sweeper.study_name)) or set()
        for child in client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{run_id}' and "
                                                  "attributes.status = 'RUNNING'"):
            trial = child.data.tags.get(tag_names.TRIAL)
            if trial is not None and trial.isdigit() and int(trial) in live:
                continue
            client.set_tag(child.info.run_id, tag_names.ERROR, "interrupted: the sweep process died")
            client.set_terminated(child.info.run_id, "KILLED")
        log.info("sweep: resuming study %s under its parent run %s%s", key, run_id,
                 f" ({len(live)} trials running in other sweeps)" if live else "")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._close(None)

    def _close(self, status: str | None) -> None:
        """Summarise the children on the parent, print the table, and end the parent."""
        if self.run is None:
            return
        client, exp_id, run_id, uri = self.run
        self.run = None
        os.environ.pop(PARENT_ENV, None)
        os.environ.pop(SWEPT_ENV, None)
        config = self.config
        elsewhere = _running_elsewhere(config)
        if elsewhere:  # every sweep of a shared study tells its trials before it ends: the last one sees none
            print(f"\nsweep: {elsewhere} trials of the study still run in other sweeps; the last of them to "
                  f"finish summarises and ends parent run {run_id}", flush=True)
            return

        objective, mode = str(config.objective), str(config.objective_mode)
        trials = summary.collect(client, exp_id, run_id, objective)
        best = summary.best_trial(trials, mode)
        table = summary.format_table(trials, objective, mode) if trials else "(no trials ran)"
        counts = {s: sum(t.status == s for t in trials) for s in {t.status for t in trials}}
        client.log_text(run_id, table + "\n", "sweep/trials.txt")
        for state, n in counts.items():
            client.log_metric(run_id, f"sweep/{state.lower()}", n)
        if best is not None:
            client.log_metric(run_id, f"best/{objective}", best.value)
            client.set_tag(run_id, tag_names.BEST_RUN_ID, best.run_id)
            client.set_tag(run_id, tag_names.BEST_TRIAL, best.name)
            for k, v in best.params.items():
                client.set_tag(run_id, f"best.{k}", v)
        with tempfile.TemporaryDirectory() as tmp:
            png = summary.plot(trials, objective, mode, Path(tmp) / "trials.png")
            if png:
                client.log_artifact(run_id, str(png), "sweep")
        registered = None
        name = config.logger.get("register_best")
        if best is not None and name and status is None:

            registered = register_run_model(client, best.run_id, str(name))
        if status is None:
            # Pruned and interrupted-then-rerun trials are part of a healthy sweep; a failed one is not.
            status = "FINISHED" if best is not None and not any(t.status == "FAILED" for t in trials) else "FAILED"
        client.set_terminated(run_id, status)
        lines = ["", f"sweep {status}: {len(trials)} trials ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}), "
                 f"sorted by {objective} ({'higher' if mode == 'max' else 'lower'} is better)", table]
        if best is not None:
            varied = " ".join(f"{k}={best.params.get(k, '')}" for k in summary.varied_keys(trials))
            lines.append(f"best: {best.label} ({varied})  {objective}={best.value:.4f}  run {best.run_id}")
        if registered:
            lines.append(f"registered: {registered}")
        lines.append(f"parent run {run_id}; compare the trials in the UI (expand the parent with [+]): "
                     + sweep_hint(client, uri, exp_id, objective, summary.varied_keys(trials)))
        print("\n".join(lines), flush=True)


def _running_elsewhere(config: DictConfig) -> int:
    """How many trials of this sweep's Optuna study other sweep processes still run."""
    if not study_key(config):
        return 0
    from hydra_plugins.tunelab_optuna_sweeper.study import live_trials

    return len(live_trials(str(config.hydra.sweeper.storage), str(config.hydra.sweeper.study_name)) or ())


def sweep_hint(client, uri: str, exp_id: str, objective: str, varied: list[str]) -> str:
    """The UI link for a sweep: its experiment's runs, with the objective and the varied keys as columns."""
    return ui_hint(uri, runs_page(exp_id, save_view(client, exp_id, objective, [f"sweep.{k}" for k in varied])))
