"""The tracking store: which one a run logs to, where its artifacts go, and whether it can be
reached (and logged into) before anything trains."""

from __future__ import annotations

import importlib.util
import os
import re
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from tunelab.config.redaction import MIN_LENGTH
from tunelab.errors import TunelabError
from tunelab.tracking.links import SECRET_PARAMS, shown_uri
from tunelab.tracking.outage import health_status


@contextmanager
def mlflow_uris_kept(point_at: str | None = None):
    """Point MLflow's process-wide (fluent) store at ``point_at`` if given, and put it back as it
    was on exit. ``mlflow.set_tracking_uri`` (which Lightning's MLFlowLogger calls) also writes
    MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI into os.environ, and the environment wins over a
    config: every later run of the process (a second ``train()`` in a notebook) and its
    subprocesses would log to this store."""
    import mlflow
    from mlflow.tracking import _model_registry, _tracking_service

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {key: os.environ.get(key) for key in keys}
    saved = (_tracking_service.utils._tracking_uri, _model_registry.utils._registry_uri)
    try:
        if point_at is not None:
            mlflow.set_tracking_uri(point_at)
            mlflow.set_registry_uri(point_at)
        yield
    finally:
        _tracking_service.utils._tracking_uri, _model_registry.utils._registry_uri = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def default_store() -> Path:
    """Where ``tunelab-train`` logs by default: ``$TUNELAB_HOME/outputs`` or ``./outputs``."""
    return Path(os.environ.get("TUNELAB_HOME", ".")).expanduser().resolve() / "outputs" / "mlflow.db"


def tracking_uri(cfg: DictConfig) -> str:
    """``MLFLOW_TRACKING_URI`` wins (servers, teams); else the local SQLite file in the config."""
    return os.environ.get("MLFLOW_TRACKING_URI") or str(cfg.logger.tracking_uri)


def _init_sqlite_store(uri: str) -> None:
    """Create / migrate a SQLite store under a file lock: two processes opening a new store at
    once (two sweeps, parallel trials) otherwise race through MLflow's schema migrations."""
    import fcntl

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before training, not after an hour, when a tracking server is down (and set up a
    local SQLite store safely when it is one)."""
    if uri.startswith("sqlite:///"):
        _init_sqlite_store(uri)
    if not uri.startswith(("http://", "https://")):
        return
    try:
        status = health_status(uri, timeout)
    except OSError as err:
        reason = getattr(err, "reason", err)
        raise TunelabError(
            f"MLflow tracking server {shown_uri(uri)} is unreachable ({reason}). Start it (tunelab-ui --port ...), "
            "fix MLFLOW_TRACKING_URI, or unset it to log to the local SQLite store."
        ) from None
    if status != 200:
        raise TunelabError(f"MLflow tracking server {shown_uri(uri)} answered /health with status {status}.")
    check_login(uri)


def check_login(uri: str) -> None:
    """A server behind a login (``tunelab-ui --auth``) answers /health to anyone: ask it for
    something that needs MLFLOW_TRACKING_USERNAME / _PASSWORD, so a refused login stops here."""
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as err:
        if err.get_http_status_code() in (401, 403):
            user = os.environ.get("MLFLOW_TRACKING_USERNAME")
            raise TunelabError(
                f"MLflow tracking server {shown_uri(uri)} refused the login "
                f"({f'user {user!r}' if user else 'MLFLOW_TRACKING_USERNAME is not set'}). Set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of that server.") from None
        # anything else surfaces where the run starts, with its own message


def artifact_location(cfg: DictConfig, uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: ``logger.artifact_root`` when the user chose
    one, else ``mlartifacts/`` beside the SQLite store the run logs to, also when
    MLFLOW_TRACKING_URI picked that store (not ./outputs of whatever folder the run started in).
    None for servers and other stores: they keep their own."""
    if uri.startswith(("http://", "https://")):
        return None
    chosen = cfg.logger.get("artifact_root")
    configured_store = _beside_store(str(cfg.logger.tracking_uri))
    if chosen and (configured_store is None or Path(str(chosen)).resolve() != configured_store):
        return str(chosen)  # set on purpose (the shipped default sits beside the configured store)
    beside = _beside_store(uri)
    return str(beside) if beside else (str(chosen) if chosen else None)


def _beside_store(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" if uri.startswith("sqlite:///") else None


# -- database stores (a team's tracking server, an Optuna study shared by machines) ---------------
def database_uri(uri: str) -> str:
    """``uri`` for the PostgreSQL driver that is installed. SQLAlchemy 2 reads ``postgresql://``
    as psycopg 3, while tunelab's ``postgres`` extra installs psycopg2: without psycopg 3,
    ``postgresql://`` means ``postgresql+psycopg2://`` (as it did in SQLAlchemy 1)."""
    scheme, sep, rest = uri.partition("://")
    if sep and scheme == "postgresql" and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return uri


def check_database(uri: str, timeout: int = 5) -> None:
    """Connect once to a database store: a wrong address, database, driver or password stops
    here in one line, the password masked (also where a driver's message would repeat it)."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = None
    try:
        url = sqlalchemy.make_url(database_uri(uri))
        connect_args = {"connect_timeout": timeout} if url.get_backend_name() == "postgresql" else {}
        engine = sqlalchemy.create_engine(url, connect_args=connect_args, poolclass=NullPool)
        with engine.connect():
            pass
    except Exception as err:  # noqa: BLE001 - any driver's failure becomes the one line below
        cause = getattr(err, "orig", None) or err
        lines = str(cause).strip().splitlines() or [type(cause).__name__]
        raise TunelabError(f"cannot connect to the database {shown_uri(uri)}: {_without_secrets(lines[0], uri)}") from None
    finally:
        if engine is not None:
            engine.dispose()


def _without_secrets(text: str, uri: str) -> str:
    """``text`` with the URI's passwords (as typed and decoded) replaced by ``***``; shorter ones
    than redaction's MIN_LENGTH only where they are a whole word (``b`` would blank every b)."""
    try:
        parts = urlsplit(uri)
        secrets = [parts.password or ""] + [v for k, v in parse_qsl(parts.query) if any(w in k.lower() for w in SECRET_PARAMS)]
    except ValueError:
        return text
    for secret in sorted({s for v in secrets for s in (v, unquote(v)) if s}, key=len, reverse=True):
        pattern = re.escape(secret) if len(secret) >= MIN_LENGTH else rf"(?<!\w){re.escape(secret)}(?!\w)"
        text = re.sub(pattern, "***", text)
    return text
