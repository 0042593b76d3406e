"""MLflow tracking: one MLflow run per training job, owned by tunelab from start to status.

Lightning's MLFlowLogger writes the metrics, but tunelab creates the run and sets its final
status itself: Lightning would mark it FINISHED after ``fit`` even if ``test`` then fails,
and a half-written run must never look successful.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lightning.pytorch.loggers import MLFlowLogger
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

import tunelab
from tunelab.config.redaction import RedactingClient, redact_value, redacted_yaml
from tunelab.errors import Preempted, TrialPruned, TunelabError
from tunelab.tracking import tag_names
from tunelab.tracking.attempts import attempt_tags
from tunelab.tracking.extra_loggers import extra_loggers, log_hyperparams
from tunelab.tracking.links import save_view, shown_uri
from tunelab.tracking.outage import Outage, bound_retries, healthy
from tunelab.tracking.plots import plot_confusion, plot_lr_history
from tunelab.tracking.preemption import continue_run, recipe_hash
from tunelab.tracking.run_records import clip as _clip, config_choices, config_hash, default_run_name, run_records
from tunelab.tracking.store import artifact_location, check_reachable, mlflow_uris_kept, tracking_uri
from tunelab.tracking.sweep_job import current_job, run_name as job_run_name


class _RunLogger(MLFlowLogger):
    """MLFlowLogger on a run tunelab owns: Lightning may not terminate it, and a remote server
    that stops answering only delays the metrics (outage.py)."""
    outage: Outage | None = None

    def finalize(self, status: str = "success") -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        send = lambda: MLFlowLogger.log_metrics(self, dict(metrics), step)  # noqa: E731
        self.outage.guarded("metrics", send) if self.outage else send()


@dataclass
class Run:
    client: MlflowClient
    run_id: str
    experiment_name: str
    tracking_uri: str
    outage: Outage | None = None  # remote servers only
    experiment_id: str | None = None
    extra_loggers: list = field(default_factory=list)  # logger=tensorboard / csv (extra_loggers.py)

    def _send(self, what: str, send) -> None:
        self.outage.guarded(what, send) if self.outage else send()

    def lightning_logger(self) -> MLFlowLogger | list:
        """What the Trainer logs to: this run, first (``trainer.logger``), then any extra loggers."""
        logger = _RunLogger(experiment_name=self.experiment_name, tracking_uri=self.tracking_uri, run_id=self.run_id)
        logger.outage = self.outage
        return [logger, *self.extra_loggers] if self.extra_loggers else logger

    def log_text(self, text: str, name: str) -> None:
        self._send(name, lambda: self.client.log_text(self.run_id, text, name))

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self._send(Path(path).name, lambda: self.client.log_artifact(self.run_id, str(path), folder))

    def log_lr_history(self, history: list[tuple[int, dict[str, float]]], stages: list[tuple[int, str]]) -> None:
        """Every param group's LR at every optimizer step as ``lr/<group>``, plus a PNG of it."""
        from mlflow.entities import Metric


        if not history:
            return
        now = int(time.time() * 1000)
        points = [Metric(f"lr/{g.replace('+', '_')}", lr, now, step) for step, lrs in history for g, lr in lrs.items()]
        for i in range(0, len(points), 1000):  # MLflow's limit per batch
            self._send("metrics", lambda chunk=points[i: i + 1000]: self.client.log_batch(self.run_id, metrics=chunk))
        with tempfile.TemporaryDirectory() as tmp:
            self.log_artifact(plot_lr_history(history, stages, Path(tmp) / "lr_schedule.png"))

    def log_confusion(self, matrix, classes: list[str]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            self.log_artifact(plot_confusion(matrix.cpu().numpy(), classes, Path(tmp) / "confusion_matrix.png"))

    def set_tag(self, key: str, value: str) -> None:
        self._send(f"tag {key}", lambda: self.client.set_tag(self.run_id, key, value))

    def fail(self, reason: str) -> None:
        """End the run FAILED from outside the training loop (a dead DDP rank)."""
        self.client.set_tag(self.run_id, tag_names.ERROR, reason[:5000])
        self.client.set_terminated(self.run_id, "FAILED")

    def log_metrics(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        self._send("metrics", lambda: self.client.log_batch(self.run_id, metrics=points))


class NoRun:
    """What DDP ranks other than 0 log to: nothing, so a job is one MLflow run."""
    run_id = None

    def lightning_logger(self) -> bool:
        return False

    def __getattr__(self, name: str):
        """Run's methods do nothing here; any other name fails as it would on rank 0, so a typo
        cannot pass silently on the ranks that log nothing."""
        if not name.startswith("_") and callable(getattr(Run, name, None)):
            return lambda *args, **kwargs: None
        raise AttributeError(f"{type(self).__name__} (and Run) has no method {name!r}")


@contextmanager
def no_run() -> Iterator[NoRun]:
    yield NoRun()


def git_commit() -> str:
    """The checkout's commit. git runs with a clean environment and no fsmonitor hook: GIT_CONFIG_*
    variables (set by whoever controls the environment) could otherwise make it run a command."""
    root = Path(tunelab.__file__).resolve().parents[2]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", ""), "LC_ALL": "C"}
    git = ["git", "-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null"]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, env=env)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def experiment_id(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        location = Path(artifact_root, name).resolve().as_uri() if artifact_root else None
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another job created it between our get and create
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def experiment_name(cfg: DictConfig, kind: str = "train") -> str:
    """Training runs go to ``logger.experiment_name``; tunelab-eval and tunelab-monitor runs to
    ``<name>-eval`` / ``<name>-monitor``, so comparing a sweep's runs compares training runs."""
    name = redact_value(str(cfg.logger.experiment_name))  # a value from the environment is withheld (redaction.py)
    return name if kind == "train" else f"{name}-{kind}"


def _new_run(client: MlflowClient, exp_id: str, cfg: DictConfig, run_name: str | None,
             kind: str) -> tuple[str, dict[str, str]]:
    """Create the run with its tags; returns its id and the params to log."""
    training = kind == "train"
    job = current_job() if training else None
    choices = config_choices() if training else {}  # a trained model's eval has no Hydra app
    params, tags = run_records(cfg, choices)
    tags.update({tag_names.VERSION: tunelab.__version__, tag_names.CONFIG_HASH: config_hash(cfg),
                 "mlflow.source.git.commit": git_commit(),
                 **{str(k): str(v) for k, v in (cfg.logger.get("tags") or {}).items()}})
    if training:  # what resume=auto needs to find this run, and to tell whether its process lives
        tags[tag_names.RECIPE_HASH] = recipe_hash(cfg)
        tags.update(attempt_tags(cfg.paths.output_dir))
    else:
        tags[tag_names.KIND] = kind
    if job is not None:
        # Nested under the sweep's parent run; the job's overrides become params and tags
        # (sweep.<key>) so the UI's compare view and parallel coordinates show the trial.
        swept = {f"sweep.{k}": _clip(v) for k, v in job.overrides.items() if not k.startswith("hydra.")}
        params.update(swept)
        tags.update(swept)
        tags[tag_names.JOB_NUM] = str(job.num)
        if job.parent_run_id:
            tags["mlflow.parentRunId"] = job.parent_run_id
        if job.trial is not None:
            tags[tag_names.TRIAL] = str(job.trial)
        run_name = run_name or job_run_name(job)
    run_name = run_name or default_run_name(cfg, choices)
    return client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id, params


def user_store(stored: DictConfig) -> DictConfig:
    """A stored config (a checkpoint's, a run's) with the logging locations it names removed: a
    file someone else may have written does not choose where this machine writes."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(stored, {"logger": {"tracking_uri": None, "artifact_root": None}})


def _open_run(client, cfg: DictConfig, uri: str, name: str, run_name: str | None, kind: str) -> tuple[str, str, dict]:
    """(experiment id, run id, params to log): a new run, or for ``resume=auto`` the run that goes on.
    Only training resumes; a trained model's config (resolved_config.yaml) may still carry the id
    of the run it resumed, which an evaluation must not take over."""
    resumed = cfg.get("_resume_run_id") if kind == "train" else None
    try:
        exp_id = experiment_id(client, name, artifact_location(cfg, uri))
        if resumed:  # the pre-empted or crashed run goes on; its params are already logged
            continue_run(client, resumed, str(cfg.ckpt_path), cfg.paths.output_dir)
            run_id, params = resumed, {}
        else:
            run_id, params = _new_run(client, exp_id, cfg, run_name, kind)
        if kind == "train" and cfg.get("objective"):
            save_view(client, exp_id, str(cfg.objective), default=True)  # tunelab-ui's link opens it
    except MlflowException as err:
        raise TunelabError(f"cannot start an MLflow run at {shown_uri(uri)}: {err.message}") from None
    return exp_id, run_id, params


def _log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=items[i: i + 100])


def _end_with(client, handle: "Run", err: BaseException) -> None:
    """Mark the run by what stopped it: KILLED when pre-empted (resumable, with the checkpoint
    resume=auto continues from), pruned by the sweeper or interrupted; FAILED otherwise."""
    if isinstance(err, Preempted):
        client.set_tag(handle.run_id, tag_names.ERROR, "pre-empted (SIGTERM)")
        if err.checkpoint:
            client.set_tag(handle.run_id, tag_names.PREEMPTED_CHECKPOINT, err.checkpoint)
        client.set_terminated(handle.run_id, "KILLED")
    elif isinstance(err, TrialPruned):  # stopped early on purpose: not a failure
        client.set_tag(handle.run_id, tag_names.TRIAL_STATE, "PRUNED")
        client.set_tag(handle.run_id, tag_names.ERROR, str(err)[:5000])
        client.set_terminated(handle.run_id, "KILLED")
    elif isinstance(err, KeyboardInterrupt):
        client.set_tag(handle.run_id, tag_names.ERROR, "interrupted")
        client.set_terminated(handle.run_id, "KILLED")
    elif handle.outage is None or not handle.outage.down or healthy(handle.tracking_uri):
        client.set_tag(handle.run_id, tag_names.ERROR, f"{type(err).__name__}: {err}"[:5000])
        client.set_terminated(handle.run_id, "FAILED")
    # else the server is down: the run cannot be marked; the error says why training stopped


@contextmanager
def mlflow_run(cfg: DictConfig, run_name: str | None = None, *, kind: str = "train",
               uri: str | None = None) -> Iterator[Run]:
    """Create the job's run; end it FINISHED, or FAILED/KILLED with the error as a tag.

    ``kind`` ``eval`` / ``monitor``: a tunelab-eval / tunelab-monitor run about a trained model,
    in its own experiment, never a sweep's child or a resumed run. ``uri``: the store to log to
    (default: MLFLOW_TRACKING_URI, else the config's)."""
    extras = extra_loggers(cfg) if kind == "train" else []  # refused before a run exists
    uri = uri or tracking_uri(cfg)
    check_reachable(uri)
    client = RedactingClient(uri)  # nothing read from the environment is sent (redaction.py)
    local = not uri.startswith(("http://", "https://"))
    name = experiment_name(cfg, kind)
    exp_id, run_id, params = _open_run(client, cfg, uri, name, run_name, kind)
    handle = Run(client, run_id, name, uri, None if local else Outage(uri, shown_uri(uri)), exp_id, extras)
    if not local:
        bound_retries()
    try:
        _log_params(client, handle.run_id, params)
        log_hyperparams(extras, params)
        handle.log_text(redacted_yaml(cfg), "config.yaml")
        with mlflow_uris_kept():  # Lightning's logger points the whole process at this store
            yield handle
    except BaseException as err:
        _end_with(client, handle, err)
        raise
    if handle.outage is not None:
        handle.outage.settle(str(cfg.paths.output_dir))  # the server is back (kept metrics sent), or an error
        if handle.outage.skipped:
            client.set_tag(handle.run_id, tag_names.NOT_LOGGED, ", ".join(handle.outage.skipped)[:5000])
    client.set_terminated(handle.run_id, "FINISHED")
