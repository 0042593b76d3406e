"""Start a daemon in the foreground of its own process group, wait for it to answer, stop it by
PID: what every local cluster here (Slurm's daemons, MariaDB, munge) needs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable


class Daemon:
    """One daemon process, run in the foreground (``-D``) so that its PID is ours to stop;
    its output goes to ``<folder>/<name>.out``."""

    def __init__(self, name: str, command: list[str], folder: Path, env: dict[str, str] | None = None):
        self.name = name
        self.log = folder / f"{name}.out"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds, to the daemon's process group."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=wait)
                return


def wait_for(ready: Callable[[], bool], daemon: Daemon, what: str, timeout: float,
             also: Daemon | None = None) -> None:
    """Poll ``ready`` until it holds; fail with the daemons' log tails if one dies or time runs out."""
    deadline = time.monotonic() + timeout
    watched = [d for d in (daemon, also) if d]
    while not ready():
        dead = [d for d in watched if d.proc.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{dead[0].name} exited with code {dead[0].proc.returncode}" if dead else f"not within {timeout:.0f} s"
            logs = "\n".join(f"--- {d.log} ---\n{d.tail()}" for d in watched)
            raise RuntimeError(f"{what} did not come up ({why}):\n{logs}")
        time.sleep(0.5)


def serve_until_stopped() -> None:
    """Block a by-hand cluster until Ctrl-C or SIGTERM (also when started in the background,
    where SIGINT is ignored), so that the caller's ``with`` block stops what it started."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            signal.pause()


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held open together, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
