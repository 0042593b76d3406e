"""Pre-emption: SIGTERM (SLURM time limits, spot instances, Kubernetes) saves a resumable
checkpoint, marks the MLflow run KILLED and exits 143; the same command plus ``resume=auto``
continues the same MLflow run from that checkpoint, ending with the weights an uninterrupted
run would have had (data/sampling.py makes the resumed batches and random draws identical).

Inside ``trainer.fit``/``test`` Lightning's own SIGTERM handler stops at the next batch
boundary (a consistent state to checkpoint); outside them tunelab's handler raises at once,
so a SIGTERM during setup or logging still ends the run as KILLED rather than RUNNING forever.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from tunelab.errors import Preempted

log = logging.getLogger(__name__)
CHECKPOINT = "preempted.ckpt"
TAG_CHECKPOINT = "tunelab.preempted_checkpoint"
TAG_RECIPE = "tunelab.recipe_hash"


class PreemptionCheckpoint(L.Callback):
    """On Lightning's SIGTERM exception, save a checkpoint the next run can resume exactly."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / "checkpoints" / CHECKPOINT
        self.saved: str | None = None

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

    @contextmanager
    def installed(self) -> Iterator["SigtermGuard"]:
        if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)


def recipe_hash(cfg: DictConfig) -> str:
    """What makes two invocations "the same command": the config without where it writes
    (timestamped output folders) and without the resume switches themselves."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    for key in ("paths", "resume", "ckpt_path", "hydra", "_resume_run_id"):
        plain.pop(key, None)
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(plain), sort_keys=True).encode()).hexdigest()[:12]


def resolve_resume(cfg: DictConfig) -> None:
    """``resume=auto``: find this recipe's latest pre-empted run and its checkpoint; put the
    checkpoint in ``cfg.ckpt_path`` and the run id in ``cfg._resume_run_id``. Nothing to
    resume means a fresh run (said in the log)."""
    from tunelab.errors import TunelabError

    setting = cfg.get("resume")
    if setting in (None, "never") or cfg.get("_resume_run_id"):  # off, or resolved already (DDP ranks)
        return
    if setting != "auto":
        raise TunelabError(f"resume must be auto or null, got {setting!r} (an explicit checkpoint: ckpt_path=PATH).")
    if cfg.get("ckpt_path"):
        raise TunelabError("resume=auto and ckpt_path are both set; give one.")
    from mlflow.tracking import MlflowClient

    from tunelab.tracking import check_reachable, tracking_uri

    uri = tracking_uri(cfg)
    check_reachable(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(str(cfg.logger.experiment_name))
    found = None
    if experiment is not None:
        runs = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`{TAG_RECIPE}` = '{recipe_hash(cfg)}' and attributes.status = 'KILLED'",
                                  order_by=["attributes.start_time DESC"], max_results=5)
        found = next((r for r in runs if Path(r.data.tags.get(TAG_CHECKPOINT, "/nonexistent")).is_file()), None)
    if found is None:
        log.info("resume=auto: no pre-empted run of this config with a checkpoint; starting a new run")
        return
    with open_dict(cfg):
        cfg.ckpt_path = found.data.tags[TAG_CHECKPOINT]
        cfg._resume_run_id = found.info.run_id
    log.info("resume=auto: continuing MLflow run %s from %s", found.info.run_id, cfg.ckpt_path)
