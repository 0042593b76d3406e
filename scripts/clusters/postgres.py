"""A throwaway PostgreSQL server on 127.0.0.1, started in seconds.

Why: a team's MLflow tracking server (``tunelab-ui --backend-store-uri postgresql://...``) and an
Optuna study shared by several machines (``hydra.sweeper.storage=postgresql://...``) sit on a real
database, where SQLite serialises every writer. This starts one for the tests that prove both,
and for trying them by hand:

    python scripts/clusters/postgres.py [FOLDER]     # prints how to use it; Ctrl-C stops it

PostgreSQL refuses to run as root, so as root its programs run as the ``postgres`` user (the
Debian package creates it), in a data folder that user owns. It listens on 127.0.0.1 only (TCP,
plus a Unix socket inside the folder) and is stopped by its PID, never by name: other PostgreSQL
servers on the machine are not touched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from tunelab.ports import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clusters.daemons import serve_until_stopped  # noqa: E402

ROLE = "tunelab"  # the superuser initdb creates; the URI logs in as it
SERVER_USER = "postgres"  # who runs the server when we are root


def pg_bin() -> Path:
    """The newest installed PostgreSQL's programs (Debian keeps them off PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    raise RuntimeError("PostgreSQL is not installed (apt-get install -y postgresql)")


def _as_server_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--", *command] if os.geteuid() == 0 else command


def _run(command: list[str], what: str, env: dict | None = None) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit code {proc.returncode}): {(proc.stdout + proc.stderr).strip()[-2000:]}")


def _server_home(folder: Path) -> tuple[Path, bool]:
    """A folder the server user owns: ``folder/postgres``, or, when that user cannot reach it
    (pytest's temp folders are root-only), a private one in the temp dir (True: remove it after)."""
    home = folder / "postgres"
    home.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return home, False
    reachable = subprocess.run(_as_server_user(["test", "-x", str(folder)]), capture_output=True).returncode == 0
    if not reachable:
        home = Path(tempfile.mkdtemp(prefix="tunelab-postgres-"))
    shutil.chown(home, SERVER_USER, SERVER_USER)
    return home, not reachable


def _init(home: Path, password: str | None) -> None:
    command = [str(pg_bin() / "initdb"), "-D", str(home / "data"), "-U", ROLE, "--no-sync", "-E", "UTF8"]
    if password is None:
        _run(_as_server_user([*command, "-A", "trust"]), "initdb")
        return
    pwfile = home / "pwfile"  # initdb reads the role's password from a file, never argv
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if os.geteuid() == 0:
        shutil.chown(pwfile, SERVER_USER, SERVER_USER)
    try:
        _run(_as_server_user([*command, "-A", "scram-sha-256", f"--pwfile={pwfile}"]), "initdb")
    finally:
        pwfile.unlink()


def _start(home: Path, port: int) -> None:
    # fsync off: a throwaway database needs no durability, and commits get ten times faster
    options = f"-k {home} -h 127.0.0.1 -p {port} -c fsync=off -c max_connections=200"
    log = home / "server.log"
    command = [str(pg_bin() / "pg_ctl"), "-D", str(home / "data"), "-l", str(log), "-o", options, "-w", "-t", "60", "start"]
    try:
        _run(_as_server_user(command), "pg_ctl start")
    except RuntimeError as err:
        tail = log.read_text(errors="replace")[-2000:] if log.is_file() else "(no log)"
        raise RuntimeError(f"PostgreSQL did not start on 127.0.0.1:{port}: {err}\nserver log:\n{tail}") from None


def _create_database(port: int, database: str, password: str | None) -> None:
    command = [str(pg_bin() / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", ROLE, "-d", "postgres",
               "-v", "ON_ERROR_STOP=1", "-q", "-c", f'create database "{database}"']
    _run(command, f"creating database {database!r}", env={"PGPASSWORD": password or ""})


def another_database(uri: str, database: str) -> str:
    """Create ``database`` on the server of ``uri`` (one that postgres_server yielded); its URI.
    An Optuna study needs its own: Optuna and MLflow both keep an ``alembic_version`` table."""
    parts = urlsplit(uri)
    password = unquote(parts.password) if parts.password else None
    _create_database(parts.port, database, password)
    return urlunsplit(parts._replace(path=f"/{database}"))


def _postmaster_pid(home: Path) -> int | None:
    try:
        return int((home / "data" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _is_postmaster(pid: int, home: Path) -> bool:
    """``pid`` is still this server's postmaster (not a process that got its number since)."""
    try:
        return str(home / "data") in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _stop(home: Path) -> None:
    """pg_ctl's fast shutdown; SIGKILL the postmaster (by its PID) if it is still there."""
    pid = _postmaster_pid(home)
    command = [str(pg_bin() / "pg_ctl"), "-D", str(home / "data"), "-m", "fast", "-w", "-t", "30", "stop"]
    subprocess.run(_as_server_user(command), capture_output=True, timeout=60)
    if pid is None or not _is_postmaster(pid, home):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
        for _ in range(50):  # its children notice the postmaster's death and exit
            os.kill(pid, 0)
            time.sleep(0.1)


def server_uri(port: int, database: str, password: str | None) -> str:
    secret = f":{quote(password, safe='')}" if password else ""
    return f"postgresql://{ROLE}{secret}@127.0.0.1:{port}/{database}"


@contextlib.contextmanager
def postgres_server(folder: Path, database: str = "mlflow", password: str | None = None) -> Iterator[str]:
    """Run PostgreSQL on a free loopback port until the block ends; yields the database's
    SQLAlchemy URI. With ``password`` the role logs in with it (scram-sha-256), else trusted.
    The server log ends up in ``folder/postgres/server.log``."""
    folder = Path(folder).resolve()
    home, temporary = _server_home(folder)
    port = free_port()
    try:
        _init(home, password)
        _start(home, port)
        _create_database(port, database, password)
        yield server_uri(port, database, password)
    finally:
        _stop(home)
        if temporary:
            with contextlib.suppress(OSError):
                shutil.copy(home / "server.log", folder / "postgres" / "server.log")
            shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from tunelab.tracking.links import shown_uri

    parser = argparse.ArgumentParser(description="Start a throwaway PostgreSQL on 127.0.0.1 until Ctrl-C, with "
                                     "a database for an MLflow server and one for Optuna studies.")
    parser.add_argument("folder", nargs="?", type=Path, default=None,
                        help="where the log and the URI files go (default: a new temp folder, removed afterwards)")
    args = parser.parse_args(argv)
    folder = (args.folder or Path(tempfile.mkdtemp(prefix="tunelab-pg-"))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    with postgres_server(folder, "mlflow", password=secrets.token_urlsafe(16)) as uri:
        # the URIs with their password go to private files, never to the screen
        files = {"mlflow": uri, "optuna": another_database(uri, "optuna")}
        for name, value in files.items():
            (folder / f"{name}.uri").touch(mode=0o600)
            (folder / f"{name}.uri").write_text(value + "\n")
        print(f"PostgreSQL on {shown_uri(uri).rsplit('/', 1)[0]} (databases mlflow and optuna: Optuna and MLflow "
              f"cannot share one); their URIs, password included, are in {folder}/*.uri\n"
              f"  export TUNELAB_PG_URI=\"$(cat {folder}/mlflow.uri)\" TUNELAB_OPTUNA_URI=\"$(cat {folder}/optuna.uri)\"\n"
              "  tunelab-ui --backend-store-uri \"$TUNELAB_PG_URI\"     # an MLflow server on it, then on each machine:\n"
              "  MLFLOW_TRACKING_URI=http://127.0.0.1:5000 tunelab-train -m hparams_search=lr_and_strategy "
              "hydra.sweeper.storage='${oc.env:TUNELAB_OPTUNA_URI}'\n"
              "Ctrl-C stops it.", flush=True)
        try:
            serve_until_stopped()
        finally:
            for name in files:
                (folder / f"{name}.uri").unlink(missing_ok=True)
    if args.folder is None:
        shutil.rmtree(folder, ignore_errors=True)
    print("PostgreSQL stopped.")


if __name__ == "__main__":
    main()
