"""Who runs an attempt of a run, and whether it still lives: each attempt (the first, and every
resume) records its output folder and process as tags and keeps a heartbeat, so ``resume=auto``
can tell a run whose process died (SIGKILL, OOM killer, node loss) from one that still runs."""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path

import lightning as L

from tunelab.errors import TunelabError
from tunelab.tracking import tag_names

HEARTBEAT_EVERY = 60.0  # seconds; a beat is one tag write
STALE_ENV, STALE_DEFAULT_MIN = "TUNELAB_HEARTBEAT_TIMEOUT_MIN", 15.0


class Heartbeat(L.Callback):
    """Tells ``resume=auto`` on another machine that this run still lives: the tag
    ``tunelab.heartbeat`` (unix seconds), from every loop, at most every ``every`` seconds."""

    def __init__(self, run, every: float = HEARTBEAT_EVERY, clock=time.monotonic):
        self.run, self.every, self.clock = run, every, clock
        self.last = clock()

    def beat(self) -> None:
        outage, now = getattr(self.run, "outage", None), self.clock()
        if now - self.last < self.every or (outage is not None and outage.down):
            return  # a server that is down hears nothing: a beat never waits for its retries
        self.last = now
        self.run.set_tag(tag_names.HEARTBEAT, str(int(time.time())))

    def on_train_batch_end(self, *args, **kwargs) -> None:
        self.beat()

    def on_validation_batch_end(self, *args, **kwargs) -> None:
        self.beat()

    def on_test_batch_end(self, *args, **kwargs) -> None:
        self.beat()


def _process_space() -> str:
    """Where a pid names one process: this machine since its last boot, in this pid namespace
    (containers on one host may share its name, never their pids)."""
    import psutil

    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux: the machine and its boot must do
        namespace = 0
    return f"{socket.gethostname()}/boot{int(psutil.boot_time())}/pidns{namespace}"


def attempt_tags(output_dir) -> dict[str, str]:
    """This attempt of a run: the folder it writes (real path), its process, a first heartbeat."""
    return {tag_names.OUTPUT_DIR: str(Path(str(output_dir)).resolve()), **process_tags(),
            tag_names.HEARTBEAT: str(int(time.time())), **slurm_job_tags()}


def process_tags() -> dict[str, str]:
    """This process as ``death`` reads it (also the owner of an Optuna trial): host, pid, and
    where and since when that pid names this process."""
    import psutil

    me = psutil.Process()
    return {tag_names.HOST: socket.gethostname(), tag_names.PID: str(me.pid),
            tag_names.PROCESS: f"{_process_space()}/{me.create_time():.2f}"}


def slurm_job_tags() -> dict[str, str]:
    """The Slurm job this attempt runs in (``<array job>_<task>`` for a sweep's array): what
    ``sacct``, ``scancel`` and the job's log file names know it by."""
    if "SLURM_JOB_ID" not in os.environ:
        return {}
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return {tag_names.SLURM_JOB_ID: f"{array}_{task}" if array and task else os.environ["SLURM_JOB_ID"]}


def stale_after_s() -> float:
    """How long a RUNNING run on another machine may be silent before it counts as dead."""
    raw = os.environ.get(STALE_ENV, str(STALE_DEFAULT_MIN))
    try:
        minutes = float(raw)
    except ValueError:
        minutes = math.nan
    if not 2 * HEARTBEAT_EVERY / 60 <= minutes < math.inf:  # a live run beats every minute
        raise TunelabError(f"{STALE_ENV} must be a number of minutes >= 2 (default {STALE_DEFAULT_MIN:g}), got {raw!r}.")
    return minutes * 60


def _alive(pid: int, started: float) -> bool:
    import psutil

    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - started) < 1.0 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def death(tags: dict[str, str], stale_after: float, now: float | None = None) -> str | None:
    """Why the process of a run MLflow shows RUNNING is gone, or None while it may still live:
    on this machine the OS knows; elsewhere, a heartbeat older than ``stale_after`` seconds."""
    who = f"pid {tags.get(tag_names.PID)} on {tags.get(tag_names.HOST)}"
    space, _, started = tags.get(tag_names.PROCESS, "").rpartition("/")
    try:
        if space == _process_space():
            return None if _alive(int(tags[tag_names.PID]), float(started)) else f"its process ({who}) is gone"
        silent = (time.time() if now is None else now) - float(tags[tag_names.HEARTBEAT])
    except (KeyError, ValueError):  # started by an older tunelab, or tags that make no sense
        return None  # cannot tell: never take over a run that may be alive
    if silent <= stale_after:
        return None
    return f"its process ({who}) has not been heard from for {silent / 60:.0f} min ({STALE_ENV}={stale_after / 60:g})"
