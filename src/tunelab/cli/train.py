"""``tunelab-train``: the Hydra app over ``conf/train.yaml``. One call = one tracked run."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig

from tunelab.config import build, conf_dir
from tunelab.errors import Preempted, TunelabError
from tunelab.tracking import tag_names

# torch, Lightning and MLflow are imported inside train(): `tunelab-train --help` and
# config errors answer in a second instead of after ten seconds of imports.

log = logging.getLogger("tunelab")


# Lightning's start-up lines that say nothing about this run (adverts, hardware it does not use,
# how it counts steps)
LIGHTNING_NOISE = ("litlogger", "TPU available", "HPU available", "to estimate number of stepping batches")


def _quiet_lightning() -> None:
    """One copy of each Lightning message, without adverts, through Hydra's handlers."""
    if logging.getLogger().handlers:  # Hydra set up console + file logging
        logging.getLogger("lightning").handlers.clear()  # its own console handler doubles every line
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not any(noise in record.getMessage() for noise in LIGHTNING_NOISE)
    )
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables"
    # Slurm's tools being installed says nothing about this run; tunelab launches its own ranks.
    warnings.filterwarnings("ignore", message=r".*The `srun` command is available on your system but is not used.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*")  # inside Lightning
    # tunelab's samplers resume mid-epoch exactly (data/sampling.py), which Lightning cannot see.
    warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")
    # Frozen groups keep their BatchNorm layers in eval mode on purpose (module.batchnorm).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=r".*all_gather is deprecated.*")  # inside Lightning
    # Under DDP the test set is sharded; docs/cluster.md says what that means for the metrics.
    warnings.filterwarnings("ignore", message=r".*Using `DistributedSampler` with the dataloaders.*")


def _callbacks(cfg: DictConfig, parts, job=None) -> list:
    extra = [build(node, f"callbacks.{name}") for name, node in (cfg.get("callbacks") or {}).items() if node]
    if job is not None and job.trial is not None:  # a trial of tunelab's Optuna sweeper
        from tunelab.sweep.trial import OptunaPruning, optuna_trial

        extra.append(OptunaPruning(optuna_trial(job), str(cfg.objective)))
    if cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar it was told not to show
        from tunelab.engine.progress import ObjectiveProgressBar

        extra.append(ObjectiveProgressBar(cfg.get("objective")))
    from tunelab.engine.perf import EpochThroughput
    from tunelab.engine.recipe import core_callbacks

    return [*core_callbacks(parts), EpochThroughput(), *extra]


@dataclass
class RunResult:
    """What one training job produced: its MLflow run and the metrics it ended with."""

    run_id: str | None
    metrics: dict[str, float]
    tracking_uri: str | None = None
    output_dir: str | None = None


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test on the best checkpoint, and record everything in one MLflow run."""
    return run_job(cfg).metrics


def run_job(cfg: DictConfig) -> RunResult:
    """train(), returning the MLflow run id as well (the notebook API's fit())."""
    from tunelab.config.redaction import protect
    from tunelab.engine.distributed import local_world_size, rank_processes
    from tunelab.engine.plan import validate
    from tunelab.sweep.trial import share_machine
    from tunelab.tracking.preemption import SigtermGuard, resolve_resume
    from tunelab.tracking.run_records import config_choices
    from tunelab.tracking.sweep_job import current_job

    protect(cfg)  # first: what the config read from the environment is in no record, log or error line
    # every _target_ of the tree, values no type catches and unknown keys: before data, model or run exist
    validate(cfg, config_choices())
    _quiet_lightning()
    job = current_job()
    if job is not None and local_world_size(cfg) == 1:  # a DDP job's ranks own their devices
        share_machine(job, cfg)
    if cfg.get("tune") is not None:  # tune=lr_find: an LR range test instead of training
        return _tune(cfg)
    resolve_resume(cfg)  # before the ranks start: they read the checkpoint from the resolved config
    with SigtermGuard().installed() as guard, rank_processes(cfg, Path(str(cfg.paths.output_dir))) as ranks:
        return _fit_and_test(cfg, job, ranks, guard)


def _fit_and_test(cfg: DictConfig, job, ranks, guard) -> RunResult:
    import lightning as L

    from tunelab.engine import recipe
    from tunelab.engine.build import build_parts
    from tunelab.engine.distributed import RankAgreement, cluster_plugins, global_rank
    from tunelab.tracking.preemption import PreemptionCheckpoint, resume_callbacks
    from tunelab.tracking.run_records import config_hash
    from tunelab.tracking.runs import mlflow_run, no_run

    rank = global_rank()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    parts = build_parts(cfg)
    if rank == 0:
        log.info("%s", parts.describe(cfg.strategy._target_.rsplit(".", 1)[-1]))
    start = time.monotonic()
    # One MLflow run per job, whatever the number of ranks: only global rank 0 logs.
    with (mlflow_run(cfg, run_name=cfg.get("run_name")) if rank == 0 else no_run()) as run:
        if ranks is not None:
            ranks.on_failure = run.fail  # a dead sibling rank fails this run at once
        _describe_run(cfg, run, parts, rank)
        callbacks = _callbacks(cfg, parts, job if rank == 0 else None)
        agreement, preemption = RankAgreement(config_hash(cfg)), PreemptionCheckpoint(cfg.paths.output_dir, guard)
        callbacks += [agreement, preemption, *resume_callbacks(cfg, run)]  # stamp + heartbeat: resume=auto after a crash
        trainer = build(cfg.trainer, "trainer", logger=run.lightning_logger(), callbacks=callbacks,
                        **cluster_plugins())
        recipe.fit(trainer, parts, cfg, guard, ranks, preemption)
        run.log_lr_history(parts.module.lr_history, parts.module.stage_log)
        recipe.log_stage_starts(trainer, parts.module)
        run.log_metrics(recipe.parameter_counts(parts.adapter.model))
        best, metrics = recipe.best_and_last_metrics(trainer, callbacks)
        metrics.update(recipe.test(trainer, parts, cfg, best, guard, ranks))
        if parts.module.test_confusion_matrix is not None:
            run.log_confusion(parts.module.test_confusion_matrix, parts.datamodule.classes)
        if rank == 0:
            checked = recipe.after_training(cfg, parts, metrics)
            metrics.update(checked)
            run.log_metrics(checked)
        run.log_metrics({"time/fit_seconds": time.monotonic() - start})
        _finish_run(cfg, run, metrics, best, agreement, ranks, rank)
        registered = _register(cfg, run, job) if best else None
    if rank == 0:
        _report(run, metrics, time.monotonic() - start, parts.datamodule.task, registered)
    return RunResult(run.run_id, metrics, run.tracking_uri if rank == 0 else None, str(cfg.paths.output_dir))


def _tune(cfg: DictConfig) -> RunResult:
    """``tune=lr_find``: the range test's own MLflow run, then the override it suggests."""
    from tunelab.config.redaction import redact
    from tunelab.engine.lr_find import find_lr
    from tunelab.tracking.links import run_link, shown_uri

    found = find_lr(cfg, build(cfg.tune, "tune"))  # its settings are refused before any run exists
    run = found.run
    lines = ["", found.summary(), f"MLflow store: {shown_uri(run.tracking_uri)} (experiment {run.experiment_name!r})"]
    if run.tracking_uri.startswith("sqlite:///"):
        lines.append(f"open the UI:  tunelab-ui --store {run.tracking_uri[len('sqlite:///'):]}")
    lines.append(f"run page:     {run_link(run.tracking_uri, run.experiment_id, run.run_id)}")
    print(redact("\n".join(lines)), flush=True)
    metrics = {"lr_find/suggested_lr": found.suggested}
    return RunResult(run.run_id, metrics, run.tracking_uri, str(cfg.paths.output_dir))


def _describe_run(cfg: DictConfig, run, parts, rank: int) -> None:
    """The stage table, the model's description and its lineage, in the run and the checkpoints."""
    from tunelab.engine.recipe import model_meta, store_description

    for key, value in (parts.lineage or {}).items():
        run.set_tag(key, value)
    meta = json.dumps(model_meta(parts), indent=1)
    run.log_text(parts.stage_table(), "stage_table.txt")
    run.log_text(meta, "model_meta.json")  # with config.yaml: what rebuilds the model later
    store_description(cfg, meta, parts.module, rank)  # inside every checkpoint, and beside them


def _finish_run(cfg: DictConfig, run, metrics: dict[str, float], best: str, agreement, ranks, rank: int) -> None:
    """The results on disk (they survive a tracking server that went down), the tested checkpoint,
    the ranks' config hashes; then every rank must end cleanly before the run may be FINISHED."""
    if rank == 0:
        (Path(str(cfg.paths.output_dir)) / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    if best:
        run.log_artifact(best, "checkpoints")
    if agreement.hashes:
        run.set_tag(tag_names.RANK_CONFIG_HASHES, ",".join(agreement.hashes))
    if ranks is not None:
        ranks.join()


def _register(cfg: DictConfig, run, job) -> str | None:
    """A single run registers its model when asked; a sweep registers only its best trial."""
    name = cfg.logger.get("register_best")
    if not name or job is not None or run.run_id is None:
        return None
    from tunelab.deploy.registry import register_run_model

    return register_run_model(run.client, run.run_id, str(name))


SHOWN = {"classification": ("val/acc", "test/acc", "test/f1"), "multilabel": ("val/map", "test/map", "test/f1"),
         "regression": ("val/mse", "test/mse", "test/mae", "test/r2")}


def _summary(metrics: dict[str, float], task: str) -> list[str]:
    """The rest of the verdict in a few lines: every test metric, each shifted split's score and
    drop, and what fine-tuning cost the pretrained model."""
    main = "acc" if task == "classification" else "mse"
    test = [f"{k[5:]} {v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("test/") and "_class/" not in k]
    ood = sorted({k.split("/")[1] for k in metrics if k.startswith("ood/")})
    change = "acc_drop" if task == "classification" else "mse_rise"
    shifted = [f"{n} {metrics[f'ood/{n}/{main}']:.4f} ({change.replace('_', ' ')} {metrics.get(f'ood/{n}/{change}', float('nan')):+.4f})"
               for n in ood if f"ood/{n}/{main}" in metrics]
    kept = [f"{k[10:]} {v:.4f}" for k, v in sorted(metrics.items())
            if k.startswith("retention/") and not k.startswith("retention/drift/") or k == "retention/drift/backbone"]
    return [f"  {label}: {', '.join(items)}" for label, items in
            (("test", test), ("shifted test splits", shifted), ("retention", kept)) if items]


def _report(run, metrics: dict[str, float], seconds: float, task: str, registered: str | None = None) -> None:
    from tunelab.config.redaction import redact
    from tunelab.tracking.links import run_link, shown_uri

    shown = {k: metrics[k] for k in SHOWN[task] if k in metrics}
    lines = [
        f"run {run.run_id} FINISHED in {seconds / 60:.1f} min: "
        + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()),
        *_summary(metrics, task),
        f"MLflow store: {shown_uri(run.tracking_uri)} (experiment {run.experiment_name!r})",
    ]
    if registered:
        lines.append(f"registered: {registered}  (mlflow.pyfunc.load_model({registered!r}))")
    if run.tracking_uri.startswith("sqlite:///"):
        lines.append(f"open the UI:  tunelab-ui --store {run.tracking_uri[len('sqlite:///'):]}")
    lines.append(f"run page:     {run_link(run.tracking_uri, run.experiment_id, run.run_id)}")
    print(redact("\n".join(["", *lines])), flush=True)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    from tunelab.tracking.sweep_job import current_job

    try:
        metrics = train(cfg)
    except TunelabError as err:
        if current_job() is not None:
            from tunelab.config.redaction import redact

            print(f"tunelab-train: error: {redact(str(err))}", file=sys.stderr)
            raise  # one failed trial: Hydra records it and the sweeper decides whether to go on
        _exit_with(err)
    except Preempted as err:
        saved = f"checkpoint {err.checkpoint}" if err.checkpoint else "no checkpoint yet (stopped before training)"
        print(f"tunelab-train: pre-empted (SIGTERM); the MLflow run is KILLED and resumable, {saved}. "
              "Continue it with the same command plus resume=auto", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("tunelab-train: interrupted; the MLflow run is marked KILLED. Resume with "
              "ckpt_path=<this run's output dir>/checkpoints/last.ckpt", file=sys.stderr)
        sys.exit(130)
    objective = cfg.get("objective")
    return metrics.get(objective) if objective else None


def _exit_with(err: TunelabError) -> None:
    """The one way a user error ends tunelab-train: one line (secrets withheld), exit status 2."""
    from tunelab.cli.common import fail
    from tunelab.config.redaction import redact

    fail("tunelab-train", redact(str(err)))


def main() -> None:
    from tunelab.config.hydra_guard import guard_hydra_callbacks
    from tunelab.config.preflight import preflight
    from tunelab.config.targets import freeze_environment
    from tunelab.cli.common import start
    from tunelab.config.compose import check_before_hydra

    freeze_environment()  # what tunelab trusts is read now, before Hydra applies anything
    start("tunelab-train")  # before Hydra makes the output folder: private files, no model hub
    argv = sys.argv[1:]
    if "--check" in argv:  # compose and validate every run of the command, train nothing
        from tunelab.engine.plan import main_check

        sys.exit(main_check(argv))
    try:
        preflight(argv)
        if not any(a in ("-h", "--help", "--hydra-help") or a.startswith(("-sc", "--shell-completion")) for a in argv):
            check_before_hydra(argv)  # Hydra acts on hydra.* (environment, logging, launcher) before train()
            _check_tracking_server()
    except TunelabError as err:
        _exit_with(err)
    guard_hydra_callbacks(_exit_with)
    _hydra_main()


def _check_tracking_server() -> None:
    """A dead server or a refused login (tunelab-ui --auth), before Hydra writes anything."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        from tunelab.tracking.store import check_reachable

        check_reachable(uri)


if __name__ == "__main__":
    main()
