"""A Ray head on 127.0.0.1, for tests and by hand: the cluster a ``hydra/launcher=ray`` sweep joins.

    python scripts/clusters/ray_head.py     # start it, print how to sweep on it, Ctrl-C stops it

Why it is started this way (Ray 2.60, measured on one machine):
- Whoever can talk to Ray runs code as its user. Every listener stays on 127.0.0.1 only
  with ``--node-ip-address=127.0.0.1`` and ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in the head's
  environment; without the variable Ray moves to this machine's network address and some
  listeners to every interface. Every process that connects needs it as well (LOOPBACK_ENV):
  otherwise Ray rewrites the 127.0.0.1 address to the network address and never connects.
- 127.0.0.1 still lets every user of this machine in, so the head asks for a token of its own
  (RAY_AUTH_MODE=token, a private file in ``folder``): client_env(folder). Left unset, Ray's
  choice depends on whether ~/.ray/auth_token happens to exist (a local ``ray.init()`` writes one).
- ``ray start`` runs in a session of its own and returns once the head is up; its daemons stay
  in its process group. They are stopped by that group, SIGTERM then SIGKILL (gcs_server and
  raylet ignore SIGTERM), together with the workers, which move to process groups of their own
  but stay in the session. Never ``ray stop``: it kills every Ray on the machine.
- Ray's unix sockets live under its temp dir and a socket path may not exceed 107 bytes: a long
  folder gets a short temp dir under /tmp instead, removed on the way out.
- The head's folder is its working directory, which is the trials' working directory too, and
  it runs with tunelab's umask (private files): trials write with the raylet's umask, not the
  umask of the command that launched the sweep.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import psutil

from tunelab.umask import chosen_umask

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clusters.daemons import free_ports, serve_until_stopped  # noqa: E402

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
MAX_TEMP_DIR = 40  # + "/session_<date>_<time>_<pid>/sockets/plasma_store" stays under 107 bytes


def client_env(folder: Path) -> dict[str, str]:
    """What the head and every process that connects to it need in their environment."""
    return {**LOOPBACK_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(folder / "auth_token")}


def write_token(folder: Path) -> None:
    token = folder / "auth_token"
    token.unlink(missing_ok=True)
    token.touch(mode=0o600)
    token.write_text(secrets.token_hex(32))


def ray_command() -> str:
    """The ``ray`` next to this Python (the venv's), so the workers run tunelab's interpreter."""
    script = Path(sys.executable).parent / "ray"
    return str(script) if script.is_file() else "ray"


def short_temp_dir(folder: Path) -> tuple[Path, bool]:
    """Ray's temp dir: under ``folder`` when short enough, else a new one under /tmp (True: ours to remove)."""
    inside = folder / "ray"
    if len(str(inside.resolve())) <= MAX_TEMP_DIR:
        inside.mkdir(parents=True, exist_ok=True)
        return inside, False
    return Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp")), True


def start_command(port: int, client_port: int, agent_port: int, temp: Path) -> list[str]:
    return [ray_command(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
            "--include-dashboard=false", "--dashboard-host=127.0.0.1", f"--dashboard-agent-listen-port={agent_port}",
            f"--ray-client-server-port={client_port}", f"--num-cpus={os.cpu_count() or 1}",
            f"--temp-dir={temp}", "--disable-usage-stats"]


def session(sid: int) -> list[psutil.Process]:
    """The live processes of session ``sid``: the head's daemons and its workers."""
    members = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
    return members


def head_session(address: str) -> int:
    """The session id of the head listening at ``address`` (its GCS port): its daemons and workers."""
    port = int(address.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return os.getsid(conn.pid)
    raise RuntimeError(f"nothing listens on {address}")


def session_logs(sid: int) -> Path:
    """The logs folder of the head's Ray session (``worker-<id>-<job>-<pid>.out`` per worker)."""
    for proc in session(sid):
        with contextlib.suppress(psutil.Error):
            for arg in proc.cmdline():
                if arg.startswith("--log_dir="):
                    return Path(arg.split("=", 1)[1])
    raise RuntimeError(f"no Ray process of session {sid} names its log folder")


def listeners(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP/UDP socket the processes ``pids`` listen on."""
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.pid in pids and conn.laddr and (conn.status == psutil.CONN_LISTEN or conn.type == socket.SOCK_DGRAM):
            found.append((conn.laddr.ip, conn.laddr.port, conn.pid))
    return found


def off_loopback(found: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """The listeners another machine could reach (0.0.0.0, ::, a network address)."""
    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip.split("%")[0])
        mapped = getattr(address, "ipv4_mapped", None)  # [::ffff:127.0.0.1]
        return (mapped or address).is_loopback

    return [entry for entry in found if not loopback(entry[0])]


def ready(address: str, env: dict[str, str], timeout: float = 20.0) -> bool:
    """``ray status`` answers (the GCS is up, our token is taken) and lists the head's node."""
    try:
        probe = subprocess.run([ray_command(), "status", f"--address={address}"], capture_output=True, text=True,
                               env={**os.environ, **env}, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0 and "Active:" in probe.stdout and " node_" in probe.stdout


def stop(sid: int, grace: float = 3.0) -> None:
    """SIGTERM the head's process group and the workers of its session, SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sid, sig)
        for proc in session(sid):  # workers: their own process groups, the head's session
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        deadline = time.monotonic() + grace
        while session(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not session(sid):
            return
    raise RuntimeError(f"Ray processes survived SIGKILL: {[p.pid for p in session(sid)]}")


def _failure(what: str, log: Path, temp: Path) -> RuntimeError:
    tails = [f"--- {log}\n{log.read_text(errors='replace')[-3000:]}"] if log.is_file() else []
    for name in ("gcs_server.err", "raylet.err"):
        for path in temp.glob(f"session_2*/logs/{name}"):
            tails.append(f"--- {path}\n{path.read_text(errors='replace')[-1500:]}")
    return RuntimeError(f"the Ray head {what}:\n" + "\n".join(tails))


@contextlib.contextmanager
def ray_head(folder: Path, timeout: float = 90.0) -> Iterator[str]:
    """Start a Ray head on 127.0.0.1 with this machine's CPUs, its files under ``folder``; yield
    its address ``127.0.0.1:<port>``; clients connect with client_env(folder). Stopped on the way
    out, also on errors."""
    folder.mkdir(parents=True, exist_ok=True)
    write_token(folder)
    env = client_env(folder)
    temp, remove_temp = short_temp_dir(folder)
    port, client_port, agent_port = free_ports(3)  # distinct: each free_port() alone may repeat
    address, log = f"127.0.0.1:{port}", folder / "ray_start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(start_command(port, client_port, agent_port, temp), cwd=folder, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **env},
                                start_new_session=True, umask=chosen_umask())
    try:
        deadline = time.monotonic() + timeout
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise _failure(f"did not start within {timeout:.0f} s", log, temp) from None
        if code != 0:
            raise _failure(f"failed to start (ray start exit code {code})", log, temp)
        while not ready(address, env):
            if time.monotonic() > deadline:
                raise _failure(f"did not answer `ray status --address={address}` within {timeout:.0f} s", log, temp)
            time.sleep(0.5)
        yield address
    finally:
        try:
            stop(proc.pid)
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)  # `ray start` itself, when it was still running
            if remove_temp:
                shutil.rmtree(temp, ignore_errors=True)


def sweep_command(address: str, folder: Path) -> str:
    """What a user types to sweep on the head (a CPU trainer where this machine has no GPU: its
    trials then ask Ray for none)."""
    import torch

    no_gpu = "" if torch.cuda.is_available() else "trainer=cpu "
    return (f"{' '.join(f'{k}={v}' for k, v in client_env(folder).items())} tunelab-train -m hydra/launcher=ray "
            f"hydra.launcher.ray.init.address={address} {no_gpu}debug=smoke optimizer.lr=1e-3,3e-4")


if __name__ == "__main__":
    home = Path(tempfile.mkdtemp(prefix="tunelab-ray-"))
    try:
        with ray_head(home) as head:
            print(f"Ray head up at {head} (127.0.0.1 only). In another shell:\n  {sweep_command(head, home)}\n"
                  f"Ctrl-C stops the head and its workers and removes {home} (its logs and token).", flush=True)
            serve_until_stopped()  # Ctrl-C or kill: stop the head, never orphan it
    finally:
        shutil.rmtree(home, ignore_errors=True)
