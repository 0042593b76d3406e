"""``tunelab-ui``: open the MLflow UI on tunelab's local store, or serve a database store
(PostgreSQL) as a team's tracking server (127.0.0.1 unless asked; with --auth behind MLflow's
login, which --allow-remote requires: see tunelab/tracking/auth.py). A database's password is
never printed and never on the server's command line (which any local user can read)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.tracking.links import shown_uri
from tunelab.tracking.store import check_database, database_uri, default_store

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tunelab-ui",
        description="Open the MLflow UI on the runs tunelab-train logged, to compare them side by side. "
        "The same server accepts runs over HTTP: MLFLOW_TRACKING_URI=http://HOST:PORT tunelab-train ...",
    )
    store = parser.add_mutually_exclusive_group()
    store.add_argument("--store", type=Path, default=None,
                       help=f"the SQLite file tunelab-train logged to (default: {default_store()})")
    store.add_argument("--backend-store-uri", default=None, metavar="URI",
                       help="a database instead of --store, for a team's server that many trials write to at "
                       "once: postgresql://USER:PASSWORD@HOST:PORT/DB (also mysql://, mssql://). The password is "
                       "shown as *** and kept off the server's command line; leave it out of the URI to use "
                       "PGPASSWORD or ~/.pgpass instead. The database must exist; MLflow creates its tables")
    parser.add_argument("--artifacts", type=Path, default=None,
                        help="folder for artifacts of runs logged through this server: clients send them over "
                        "HTTP, the server writes them here (default: mlartifacts/ beside the --store file; "
                        "./outputs/mlartifacts with --backend-store-uri)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; another address "
                        "needs --allow-remote and --auth)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow --host to be an address other machines can reach; needs --auth")
    parser.add_argument("--auth", action="store_true",
                        help="require a login (MLflow's basic-auth app): the admin is created on the first "
                        "start from TUNELAB_UI_ADMIN_PASSWORD or a prompt; clients set "
                        "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
    parser.add_argument("--admin-user", default="admin",
                        help="the admin's user name with --auth (default admin)")
    parser.add_argument("--create", action="store_true",
                        help="create the store if it does not exist yet (a new tracking server for sweeps)")
    parser.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    parser.add_argument("--experiment", default=None,
                        help="the experiment whose runs the printed link opens (default: the one trained in last)")
    parser.add_argument("--workers", type=int, default=None,
                        help="server worker processes (default: MLflow's); SQLite serialises writes anyway")
    return parser.parse_args(argv)


def server_command(args: argparse.Namespace) -> tuple[list[str], str, Path]:
    """The ``mlflow server`` command line, the store it serves and the folder beside that store.
    A store URI with a password is not on the command line: see ``store_environment``."""
    if args.backend_store_uri:
        uri, base = database_uri(args.backend_store_uri), Path.cwd() / "outputs"
    else:
        store = (args.store or default_store()).expanduser().resolve()
        if not store.is_file() and args.create:
            store.parent.mkdir(parents=True, exist_ok=True)
        elif not store.is_file():
            raise SystemExit(
                f"tunelab-ui: error: no MLflow store at {store}. Run tunelab-train first, "
                "pass --store /path/to/mlflow.db (tunelab-train prints it at the end of each run), "
                "or add --create to start a new store."
            )
        uri, base = f"sqlite:///{store}", store.parent
    artifacts = (args.artifacts or base / "mlartifacts").expanduser().resolve()
    command = [
        sys.executable, "-m", "mlflow", "server",
        *([] if store_environment(uri) else ["--backend-store-uri", uri]),
        "--artifacts-destination", str(artifacts),
        "--host", args.host, "--port", str(args.port),
    ]
    if args.workers:
        command += ["--workers", str(args.workers)]
    if args.auth:
        command += ["--app-name", "basic-auth"]
    return command, uri, base


def store_environment(uri: str) -> dict[str, str]:
    """A store URI that holds a password reaches the server through its environment (``mlflow
    server`` reads MLFLOW_BACKEND_STORE_URI), readable by its own user only, unlike argv."""
    return {"MLFLOW_BACKEND_STORE_URI": uri} if shown_uri(uri) != uri else {}


def check_store(uri: str) -> None:
    """A database store is reached before the server starts: a wrong address or password is one
    line here, not a traceback from each server worker."""
    if uri.startswith("sqlite:"):
        return
    try:
        check_database(uri)
    except TunelabError as err:
        raise SystemExit(f"tunelab-ui: error: {err} (--backend-store-uri)") from None


def landing_page(uri: str, experiment: str | None = None) -> str:
    """The URL fragment of the runs table to open: ``experiment``'s, else that of the experiment
    tunelab trained in last, in the view tunelab saved on it (objective as a column). "" when
    there is nothing to open yet: the UI's home page then."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from tunelab.tracking.links import DEFAULT_VIEW_TAG, runs_page

    try:
        client = MlflowClient(uri)
        if experiment:
            found = client.get_experiment_by_name(experiment)
            return runs_page(found.experiment_id, found.tags.get(DEFAULT_VIEW_TAG)) if found else ""
        ours = {e.experiment_id: e for e in client.search_experiments(max_results=1000) if DEFAULT_VIEW_TAG in e.tags}
        latest = client.search_runs(list(ours), max_results=1, order_by=["attributes.start_time DESC"]) if ours else []
    except MlflowException:
        return ""
    if not latest:
        return ""
    exp_id = latest[0].info.experiment_id
    return runs_page(exp_id, ours[exp_id].tags[DEFAULT_VIEW_TAG])


def refuse_exposure(args: argparse.Namespace) -> None:
    """Another machine may reach the server only when asked for, and only behind a login: whoever
    can write to it can replace a registered model, which is code run where it is loaded."""
    if args.allow_remote and not args.auth:
        raise SystemExit("tunelab-ui: error: --allow-remote needs --auth: without a login anyone who reaches "
                         "the server can read, delete and replace runs and registered models.")
    if args.host not in LOOPBACK and not args.allow_remote:
        raise SystemExit(f"tunelab-ui: error: --host {args.host} would expose the runs to other machines. "
                         "Add --allow-remote --auth if that is what you want.")


def banner(args: argparse.Namespace, uri: str, page: str, created_admin: bool | None) -> str:
    host = f"[{args.host}]" if ":" in args.host else args.host
    client = f"MLFLOW_TRACKING_URI=http://{host}:{args.port}"
    lines = [f"MLflow UI on {shown_uri(uri)}",
             f"  open http://{host}:{args.port}/{page} in a browser (Ctrl+C stops the server)"]
    if created_admin is not None:
        client += f" MLFLOW_TRACKING_USERNAME={args.admin_user} MLFLOW_TRACKING_PASSWORD=..."
        lines.append(f"  login required: user {args.admin_user!r} ("
                     + ("created now" if created_admin else "created earlier; its password is unchanged") + ")")
    lines.append(f"  log runs and sweeps to it: {client} tunelab-train ...")
    if args.host not in LOOPBACK:
        lines.append(f"  warning: bound to {args.host}; passwords travel in clear over HTTP: "
                     "put a TLS proxy in front of it beyond a trusted network.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from tunelab.umask import set_for_cli

    set_for_cli("tunelab-ui")  # the store, artifacts and auth files the server creates are private
    args = parse_args(argv)
    refuse_exposure(args)
    command, uri, base = server_command(args)
    check_store(uri)
    new_store = uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file()  # --create
    created_admin = None
    if args.auth:
        from tunelab.tracking.auth import prepare

        stem = Path(uri[len("sqlite:///"):]).stem if uri.startswith("sqlite:///") else "mlflow"
        try:
            created_admin = prepare(base, args.admin_user, stem)
        except TunelabError as err:
            raise SystemExit(f"tunelab-ui: error: {err}") from None
    page = "" if new_store else landing_page(uri, args.experiment)
    print(banner(args, uri, page, created_admin), flush=True)
    # MLflow's GenAI job runner (seven worker processes polling the same SQLite file) does
    # nothing for training runs; it only competes with the sweep's writers for the store.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.environ.update(store_environment(uri))
    os.execv(command[0], command)  # the server owns the terminal and its signals from here on


if __name__ == "__main__":
    main()
