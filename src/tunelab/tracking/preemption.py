"""Pre-emption: SIGTERM (SLURM time limits, spot instances, Kubernetes) saves a resumable
checkpoint, marks the MLflow run KILLED and exits 143; the same command plus ``resume=auto``
continues the same MLflow run from that checkpoint, ending with the weights an uninterrupted
run would have had (data/sampling.py makes the resumed batches and random draws identical).

Inside ``trainer.fit``/``test`` Lightning's own SIGTERM handler stops at the next batch
boundary (a consistent state to checkpoint); outside them tunelab's handler raises at once,
so a SIGTERM during setup or logging still ends the run as KILLED rather than RUNNING forever.

A SIGKILL (OOM killer, a scheduler after its grace period, node loss) leaves no checkpoint and
the run RUNNING: each attempt records its output folder and process as tags and keeps a
heartbeat, so ``resume=auto`` can tell a dead run from a live one and continue it from its
``last.ckpt``. Run tags are writable by any client of a shared server, so they only point:
a checkpoint is resumed only from inside the run's own output folder (real paths, under this
command's outputs) and only when the recipe and run stamped inside it at save time match.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from tunelab.adapters.weights import load_checkpoint
from tunelab.errors import Preempted, TunelabError
from tunelab.tracking import tag_names
from tunelab.tracking.attempts import Heartbeat, attempt_tags, death, stale_after_s
from tunelab.tracking.store import check_reachable, tracking_uri

log = logging.getLogger(__name__)
CHECKPOINT = "preempted.ckpt"
# submitit asks Slurm for this signal hydra.launcher.signal_delay_s before the time limit; its own
# handler would end the job mid-step (or requeue it without resume=auto), so tunelab takes it.
SLURM_WARNING = signal.SIGUSR2
# Each attempt of a run (the first, and every resume) records where it writes and who it is.
# Inside every checkpoint (plain strings, weights_only reads them): who saved it.
STAMP_RECIPE, STAMP_RUN = "tunelab_recipe_hash", "tunelab_run_id"


class PreemptionCheckpoint(L.Callback):
    """On Lightning's SIGTERM exception, save a checkpoint the next run can resume exactly."""

    def __init__(self, folder: str | Path, guard: "SigtermGuard | None" = None):
        self.path = Path(folder) / "checkpoints" / CHECKPOINT
        self.saved: str | None = None
        self.guard = guard

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        # Lightning sets its signal handlers when fit starts and forgets any SIGTERM before:
        # one that came in between (the guard held it for Lightning) is sent again now.
        if self.guard is not None and self.guard.pending:
            self.guard.pending = False
            os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.path)  # every rank takes part; rank 0 writes
            self.saved = str(self.path)
            log.warning("SIGTERM: saved a resumable checkpoint at %s (step %d)", self.path, trainer.global_step)


class SigtermGuard:
    """SIGTERM raises :class:`Preempted` at once, except while a Lightning trainer call runs
    (``with guard.lightning():``), where Lightning stops cleanly at the next batch."""

    def __init__(self):
        self.in_lightning = False
        self.pending = False  # a SIGTERM that came while Lightning was meant to handle it

    @contextmanager
    def lightning(self) -> Iterator[None]:
        self.in_lightning = True
        try:
            yield
        finally:
            self.in_lightning = False

    def _handle(self, signum, frame) -> None:
        if not self.in_lightning:
            raise Preempted()
        self.pending = True

    @staticmethod
    def _relay(signum, frame) -> None:
        """submitit's warning that a Slurm job nears its time limit (or is pre-empted) becomes a
        SIGTERM: the same clean stop, while there is time left to write the checkpoint."""
        log.warning("%s from Slurm: the job nears its time limit; stopping as on SIGTERM",
                    signal.Signals(signum).name)
        os.kill(os.getpid(), signal.SIGTERM)

    @contextmanager
    def installed(self) -> Iterator["SigtermGuard"]:
        if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
            yield self
            return
        relayed = [SLURM_WARNING] if "SLURM_JOB_ID" in os.environ else []
        previous = {sig: signal.signal(sig, self._relay) for sig in relayed}
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def recipe_hash(cfg: DictConfig) -> str:
    """What makes two invocations "the same command": the config without where it writes
    (timestamped output folders) and without the resume switches themselves."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    for key in ("paths", "resume", "ckpt_path", "hydra", "_resume_run_id"):
        plain.pop(key, None)
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(plain), sort_keys=True).encode()).hexdigest()[:12]


class RecipeStamp(L.Callback):
    """Writes into every checkpoint which recipe and which MLflow run saved it, so that
    ``resume=auto`` continues a run only from that run's own checkpoints of this config."""

    def __init__(self, recipe: str, run_id: str | None):
        self.recipe, self.run_id = recipe, run_id

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[STAMP_RECIPE] = self.recipe
        if self.run_id:  # ranks other than 0 do not know it, and do not write the file
            checkpoint[STAMP_RUN] = self.run_id


def resume_callbacks(cfg: DictConfig, run) -> list[L.Callback]:
    """What every training needs so that ``resume=auto`` can continue it after a crash."""
    stamp = RecipeStamp(recipe_hash(cfg), run.run_id)
    return [stamp, Heartbeat(run)] if run.run_id else [stamp]


# -- which checkpoint a run may be resumed from --------------------------------------------------


class Refused(Exception):
    """Why ``resume=auto`` will not continue a run from a checkpoint (logged; it is never loaded)."""


def read_stamp(path: str | Path) -> dict:
    """The stamp and step of a checkpoint, read with ``weights_only=True`` and memory-mapped (a
    large checkpoint is not read whole only to be judged); a file that would run code is refused."""
    import torch


    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - old formats cannot be mapped; the plain safe loader says what is wrong
        checkpoint = load_checkpoint(path, "resume=auto")
    if not isinstance(checkpoint, dict):
        return {}
    return {key: checkpoint.get(key) for key in (STAMP_RECIPE, STAMP_RUN, "global_step")}


def _outputs(cfg: DictConfig) -> Path:
    """Where this command's runs live: a run whose folder is elsewhere was not written by it.
    (A paths config of the user's own without ``log_dir``: the folder holding this run's.)"""
    outputs = OmegaConf.select(cfg, "paths.log_dir") or Path(str(cfg.paths.output_dir)).parent
    return Path(str(outputs)).resolve()


def recorded_folders(tags: dict[str, str]) -> list[str]:
    """The output folders a run's attempts recorded, newest first."""
    folders = [tags.get(tag_names.OUTPUT_DIR, ""), *tags.get(tag_names.EARLIER_OUTPUT_DIRS, "").splitlines()]
    return [f for f in dict.fromkeys(folders) if f.strip()]


def _real(path: str | Path) -> Path:
    """``path`` with every symlink and ``..`` resolved; a tag no path can be made of is refused."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError, ValueError) as err:  # a link loop, a NUL byte
        raise Refused(f"{str(path)[:200]!r} is not a usable path ({err})") from None


def run_folders(run, outputs: Path) -> list[Path]:
    """The output folders of a run's attempts (newest first, real paths) that lie under ``outputs``."""
    folders = [_real(f) for f in recorded_folders(run.data.tags)]
    if not folders:
        raise Refused("it records no output folder (started by an older tunelab); "
                      "continue it with ckpt_path=<its checkpoint> if you trust that file")
    inside = [f for f in folders if f.is_relative_to(outputs)]
    if not inside:
        raise Refused(f"its output folder {folders[0]} is not under this command's outputs {outputs} "
                      "(a run tag may have been changed)")
    return inside


def check_checkpoint(run, path: Path, recipe: str, folders: list[Path]) -> int:
    """The step ``run`` would resume at from ``path``; :class:`Refused` unless the file lies in
    one of the run's folders (symlinks and ``..`` resolved) and was saved by this run and recipe."""
    real = _real(path)
    if not any(real.is_relative_to(folder) for folder in folders):
        raise Refused(f"{path} is outside the run's output folder {folders[0]}")
    if not real.is_file():
        raise Refused(f"{path} does not exist")
    try:
        stamp = read_stamp(real)
    except TunelabError as err:
        raise Refused(str(err)) from None
    if stamp.get(STAMP_RECIPE) is None:
        raise Refused("it carries no recipe stamp (saved weights-only, or by an older tunelab); "
                      f"continue from it with ckpt_path={path} if you trust that file")
    if stamp.get(STAMP_RECIPE) != recipe:
        raise Refused(f"it was saved by another config (recipe hash {stamp.get(STAMP_RECIPE)}; this command's "
                      f"is {recipe})")
    if stamp.get(STAMP_RUN) != run.info.run_id:
        raise Refused(f"it was saved by another run ({stamp.get(STAMP_RUN)})")
    return int(stamp.get("global_step") or 0)


def _resumable(run, recipe: str, outputs: Path, stale_after: float) -> Path | None:
    """The checkpoint this pre-empted or crashed run may continue from (the latest step), or None
    with the reasons logged."""
    tags, run_id = run.data.tags, run.info.run_id
    if run.info.status == "KILLED":
        if tag_names.PREEMPTED_CHECKPOINT not in tags:
            return None  # stopped on purpose (Ctrl+C, a pruned trial): not for resume=auto
        paths = [Path(tags[tag_names.PREEMPTED_CHECKPOINT])]
    else:
        died = death(tags, stale_after)
        if died is None:
            log.info("resume=auto: run %s of this config is RUNNING and may be alive; leaving it alone", run_id)
            return None
        log.warning("resume=auto: run %s is RUNNING in MLflow but %s", run_id, died)
        paths = [Path(f) / "checkpoints" / "last.ckpt" for f in recorded_folders(tags)]
        paths += [Path(tags[tag_names.RESUMED_FROM])] if tags.get(tag_names.RESUMED_FROM) else []
    try:
        folders = run_folders(run, outputs)
    except Refused as why:
        log.warning("resume=auto: not resuming run %s: %s", run_id, why)
        return None
    steps = {}
    for path in paths:
        try:
            steps[path] = check_checkpoint(run, path, recipe, folders)
        except Refused as why:
            log.warning("resume=auto: not resuming run %s from %s: %s", run_id, path, why)
    return Path(max(steps, key=steps.get)).resolve() if steps else None


def resolve_resume(cfg: DictConfig) -> None:
    """``resume=auto``: find this recipe's latest pre-empted run, or a RUNNING one whose process
    died, and the checkpoint it may continue from; put the checkpoint in ``cfg.ckpt_path`` and
    the run id in ``cfg._resume_run_id``. Nothing to resume means a fresh run (said in the log)."""
    setting = cfg.get("resume")
    if setting in (None, "never") or cfg.get("_resume_run_id"):  # off, or resolved already (DDP ranks)
        return
    if setting != "auto":
        raise TunelabError(f"resume must be auto or null, got {setting!r} (an explicit checkpoint: ckpt_path=PATH).")
    if cfg.get("ckpt_path"):
        raise TunelabError("resume=auto and ckpt_path are both set; give one.")
    stale_after = stale_after_s()
    from mlflow.tracking import MlflowClient


    uri = tracking_uri(cfg)
    check_reachable(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(str(cfg.logger.experiment_name))
    recipe = recipe_hash(cfg)
    runs = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], max_results=20, order_by=["attributes.start_time DESC"],
        filter_string=f"tags.`{tag_names.RECIPE_HASH}` = '{recipe}' and attributes.status != 'FINISHED' "
                      "and attributes.status != 'FAILED'")
    for run in runs:
        checkpoint = _resumable(run, recipe, _outputs(cfg), stale_after)
        if checkpoint is not None:
            with open_dict(cfg):
                cfg.ckpt_path = str(checkpoint)
                cfg._resume_run_id = run.info.run_id
            log.info("resume=auto: continuing MLflow run %s from %s", run.info.run_id, checkpoint)
            return
    log.info("resume=auto: no pre-empted or crashed run of this config with a checkpoint; starting a new run")


def continue_run(client, run_id: str, checkpoint: str, output_dir) -> None:
    """Reopen the run ``resume=auto`` chose: record this attempt (folder, process, heartbeat) and
    where its history resumes (metric ``resumed`` at that step). An attempt that died without a
    checkpoint (the run was still RUNNING) is named in ``tunelab.lost_attempts`` with the step
    after which its work was lost: its metrics after that step are logged a second time."""
    from mlflow.entities import Metric, RunTag

    run = client.get_run(run_id)
    tags, step = run.data.tags, int(read_stamp(checkpoint).get("global_step") or 0)
    attempt = attempt_tags(output_dir)
    earlier = [f for f in recorded_folders(tags) if f != attempt[tag_names.OUTPUT_DIR]]
    updates = {**attempt, tag_names.RESUMED_FROM: checkpoint, **({tag_names.EARLIER_OUTPUT_DIRS: "\n".join(earlier)} if earlier else {})}
    if run.info.status == "RUNNING":  # resolve_resume found its process dead
        lost = (f"the attempt of pid {tags.get(tag_names.PID)} on {tags.get(tag_names.HOST)} died without a checkpoint "
                f"after step {step}; resumed from {checkpoint}")
        updates[tag_names.LOST_ATTEMPTS] = "\n".join(filter(None, [tags.get(tag_names.LOST_ATTEMPTS), lost]))[-5000:]
        log.warning("resume=auto: %s", lost)
    client.update_run(run_id, status="RUNNING")
    client.log_batch(run_id, metrics=[Metric("resumed", 1.0, int(time.time() * 1000), step)],
                     tags=[RunTag(k, v) for k, v in updates.items()])
