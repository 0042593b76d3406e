"""A real single-node Slurm cluster on 127.0.0.1, with accounting, for tests and by hand.

    python scripts/clusters/slurm.py        # start it, print how to submit to it, Ctrl-C stops it

Debian's ``slurm-wlm``, ``slurmdbd``, ``munge`` and ``mariadb-server`` packages, no systemd: the
daemons are started here and stopped by their PIDs. Accounting (slurmdbd on a private MariaDB)
is not optional: without it submitit cannot tell a cancelled job from a running one and waits
for its result forever. Everything the cluster writes (state, spool, logs, database) lives in
one folder; clients find the cluster through ``SLURM_CONF``.

MariaDB listens on 127.0.0.1 only. Slurm 22.05's daemons have no bind-address setting: slurmctld,
slurmd and slurmdbd listen on every interface (on random ports, and they accept only
munge-signed requests from holders of this machine's munge key). Run it on a machine whose
firewall keeps those ports in.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clusters.daemons import Daemon, free_ports, serve_until_stopped, wait_for  # noqa: E402

MUNGE_SOCKET = Path("/run/munge/munge.socket.2")  # slurmdbd only talks to munge at its default socket
PACKAGES = "slurm-wlm slurmdbd munge mariadb-server"


def munge_works() -> bool:
    credential = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
    if credential.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=credential.stdout, capture_output=True, timeout=10).returncode == 0


def start_munge(folder: Path) -> Daemon | None:
    """munged at its default socket; one already running there (with its key) is reused."""
    if MUNGE_SOCKET.exists() and munge_works():
        return None
    key = Path("/etc/munge/munge.key")
    if not key.is_file():  # the package makes one; a bare machine gets a random one
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
    MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
    MUNGE_SOCKET.unlink(missing_ok=True)
    daemon = Daemon("munged", ["munged", "--foreground", "--force", f"--key-file={key}"], folder)
    wait_for(munge_works, daemon, "munge credentials", timeout=20)
    return daemon


def start_mariadb(folder: Path, port: int, password: str) -> Daemon:
    """A private MariaDB on 127.0.0.1 for slurmdbd, with a ``slurm`` user that owns its database."""
    data, sock = folder / "mariadb", folder / "mariadb.sock"
    subprocess.run(["mariadb-install-db", "--no-defaults", "--user=root", f"--datadir={data}",
                    "--auth-root-authentication-method=normal"], check=True, capture_output=True, timeout=120)
    daemon = Daemon("mariadbd", ["mariadbd", "--no-defaults", "--user=root", "--bind-address=127.0.0.1",
                                 f"--port={port}", f"--datadir={data}", f"--socket={sock}",
                                 "--skip-name-resolve"], folder)
    sql = (f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}';"
           "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")
    ready = lambda: subprocess.run(["mariadb", f"--socket={sock}", "-uroot", "-e", "select 1"],  # noqa: E731
                                   capture_output=True, timeout=10).returncode == 0
    wait_for(ready, daemon, "MariaDB", timeout=60)
    subprocess.run(["mariadb", f"--socket={sock}", "-uroot", "-e", sql], check=True, capture_output=True, timeout=30)
    return daemon


def write_configs(folder: Path, node: str, ports: dict[str, int], password: str) -> Path:
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(f"""\
ClusterName=tunelab
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ports["ctld"]}
SlurmdPort={ports["slurmd"]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MessageTimeout=5
ReturnToService=2
KillWait=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={ports["dbd"]}
NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    dbd = folder / "slurmdbd.conf"  # slurmdbd reads it next to slurm.conf; it holds a password: 600
    dbd.touch(mode=0o600)
    dbd.write_text(f"""\
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort={ports["dbd"]}
SlurmUser=root
PidFile={folder}/slurmdbd.pid
LogFile={folder}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports["db"]}
StorageUser=slurm
StoragePass={password}
StorageLoc=slurm_acct_db
""")
    return conf


def idle(env: dict[str, str]) -> bool:
    state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env, timeout=10)
    return state.returncode == 0 and state.stdout.strip() == "idle"


def accounting_answers(env: dict[str, str]) -> bool:
    return subprocess.run(["sacctmgr", "-n", "list", "cluster"], capture_output=True, env=env,
                          timeout=10).returncode == 0


def require_packages() -> None:
    missing = [tool for tool in ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "sbatch")
               if not any(Path(d, tool).exists() for d in ("/usr/sbin", "/usr/bin"))]
    if missing:
        raise RuntimeError(f"Slurm is not installed here (missing {', '.join(missing)}): "
                           f"apt-get install {PACKAGES}, or run scripts/setup_clusters.sh as root")


@contextlib.contextmanager
def slurm_cluster(folder: Path) -> Iterator[dict[str, str]]:
    """Start munge, MariaDB, slurmdbd, slurmctld and slurmd; yield the clients' environment
    (``SLURM_CONF``). Every daemon started here is stopped by its PID on the way out."""
    require_packages()
    folder.mkdir(parents=True, exist_ok=True)
    node = socket.gethostname().split(".")[0]
    ports = dict(zip(("ctld", "slurmd", "dbd", "db"), free_ports(4)))
    password = secrets.token_hex(12)
    conf = write_configs(folder, node, ports, password)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started: list[Daemon] = []
    try:
        started += [d for d in [start_munge(folder)] if d]
        started.append(start_mariadb(folder, ports["db"], password))
        started.append(Daemon("slurmdbd", ["slurmdbd", "-D"], folder, env))
        wait_for(lambda: accounting_answers(env), started[-1], "slurmdbd", timeout=60)
        started.append(Daemon("slurmctld", ["slurmctld", "-D", "-i"], folder, env))
        started.append(Daemon("slurmd", ["slurmd", "-D", "-N", node], folder, env))
        wait_for(lambda: idle(env), started[-2], "an idle Slurm node", timeout=90, also=started[-1])
        yield {"SLURM_CONF": str(conf)}
    finally:
        for daemon in reversed(started):
            daemon.stop()


if __name__ == "__main__":
    import tempfile

    with slurm_cluster(Path(tempfile.mkdtemp(prefix="tunelab-slurm-"))) as cluster_env:
        print(f"Slurm is up (node idle). In another shell:\n"
              f"  export SLURM_CONF={cluster_env['SLURM_CONF']}\n"
              f"  sinfo; tunelab-train -m hydra/launcher=slurm trainer=cpu hydra.launcher.cpus_per_task=1 "
              f"debug=smoke optimizer.lr=1e-3,3e-4\nCtrl-C stops every daemon started here.", flush=True)
        serve_until_stopped()
