"""A remote MLflow server that stops answering mid-run never costs the training.

At start an unreachable server is an error before anything trains (tracking.check_reachable).
Once training runs, a failed call to the server starts an *outage*: training goes on, metrics
are kept in memory, artifacts that could not be sent are listed, and the server is probed
(``/health``, 2 s) at most every ``PROBE_EVERY`` seconds. When it answers again the kept
metrics are sent. If it is still down when the run ends, tunelab says where the results are
on disk (checkpoints, ``metrics.json``) and exits with an error: the run is not finished in
MLflow, so it must not look finished.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.request
from dataclasses import dataclass, field

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)
PROBE_EVERY = 10.0  # seconds between health probes while the server is down
# MLflow retries a failed request 7 times with exponential backoff (~4 min) before giving up:
# a training job should start its outage handling sooner, and a refused connection is not rate limiting.
RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def bound_retries() -> None:
    for key, value in RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)


def health_status(uri: str, timeout: float = 2.0) -> int:
    """The HTTP status of a tracking server's ``/health``; OSError when nothing answers."""
    with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
        return response.status


def healthy(uri: str, timeout: float = 2.0) -> bool:
    try:
        return health_status(uri, timeout) == 200
    except OSError:
        return False


@dataclass
class Outage:
    """The state of a remote server during one run: down or not, and what waits to be sent."""

    uri: str
    shown: str = ""  # the URI without its password, for messages
    down: bool = False
    pending: list = field(default_factory=list)  # callables that send one kept batch of metrics
    skipped: list[str] = field(default_factory=list)  # artifacts / tags that could not be sent
    last_probe: float = 0.0

    def guarded(self, what: str, send) -> None:
        """Call ``send()``; while the server is down, keep it (metrics) or list ``what`` instead."""
        if self.down and not self._back():
            self._hold(what, send)
            return
        try:
            send()
        except Exception as err:  # noqa: BLE001 - decided by asking the server, below
            if healthy(self.uri):
                raise  # the server is up: a real error (bad value, permissions), not an outage
            if not self.down:
                log.warning("MLflow server %s stopped answering (%s); training goes on, metrics are kept and "
                            "sent when it answers again", self.shown, type(err).__name__)
            self.down, self.last_probe = True, time.monotonic()
            self._hold(what, send)

    def _hold(self, what: str, send) -> None:
        if what == "metrics":
            self.pending.append(send)
        else:
            self.skipped.append(what)

    def _back(self) -> bool:
        """Probe the server (rate-limited); when it is back, send what was kept."""
        if time.monotonic() - self.last_probe < PROBE_EVERY:
            return False
        self.last_probe = time.monotonic()
        if not healthy(self.uri):
            return False
        self.down = False
        kept, self.pending = self.pending, []
        for send in kept:
            send()
        log.warning("MLflow server %s answers again; sent %d kept metric batches%s", self.shown, len(kept),
                    f" (not logged meanwhile: {', '.join(self.skipped)})" if self.skipped else "")
        return True

    def settle(self, output_dir: str) -> None:
        """At the end of the run: the server must be back (kept metrics sent), else say where the
        results are and fail."""
        if self.down:
            self.last_probe = 0.0
            if not self._back():
                raise TunelabError(
                    f"the MLflow server {self.shown} went down during the run and is still down; nothing is lost: "
                    f"checkpoints, resolved config and metrics.json are in {output_dir}. The MLflow run stays "
                    "RUNNING; log the result later with tunelab-eval <that folder>/checkpoints/last.ckpt.")
