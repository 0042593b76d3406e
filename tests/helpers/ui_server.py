"""Start ``tunelab-ui`` on a loopback port for a test and stop it by process group: the one
starter the UI, sweep, fault and browser tests share."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from tunelab.ports import free_port
from tunelab.tracking.outage import healthy


def _tunelab_ui() -> list[str]:
    script = Path(sys.executable).parent / "tunelab-ui"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tunelab.cli.ui"]


@contextlib.contextmanager
def start_ui(store: Path | None, port: int | None = None, timeout: float = 90.0, *, create: bool = False,
             workers: int | None = 1, log_path: Path | None = None, backend_store_uri: str | None = None,
             artifacts: Path | None = None) -> Iterator[str]:
    """Run ``tunelab-ui --store STORE`` on a loopback port until the block ends; yields its URL.

    ``create`` starts a new store, ``workers=None`` keeps the server's default worker count,
    ``log_path`` keeps the server's output for the caller; ``backend_store_uri`` (with
    ``store=None``) serves a database instead, its artifacts in ``artifacts``. The server runs in
    its own process group, which is killed on the way out, also on errors.
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    where = ["--backend-store-uri", backend_store_uri] if backend_store_uri else ["--store", str(store)]
    command = [*_tunelab_ui(), *where, "--port", str(port)]
    command += ["--artifacts", str(artifacts)] if artifacts else []
    command += ["--create"] if create else []
    command += ["--workers", str(workers)] if workers else []
    with (open(log_path, "w+") if log_path else tempfile.TemporaryFile("w+")) as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"tunelab-ui did not come up on {url} "
                                       f"(exit code {proc.poll()}):\n{log.read()[-3000:]}")
                time.sleep(0.5)
            yield url
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the server's process group (the server and its workers), SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, or it counts as alive
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
