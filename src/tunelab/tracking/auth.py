"""``tunelab-ui --auth``: MLflow's basic-auth app (``mlflow server --app-name basic-auth``) in
front of the store.

Why: a registered model is code (``mlflow.pyfunc.load_model`` runs the Python logged with it),
so whoever can write to the tracking server can run code in whoever loads its models. With
--auth every request but ``/health`` needs a user; only the admin, the creator of an experiment
or model, or a user granted it may write (others get MLflow's ``default_permission``: READ).

The admin is created once, in an auth database beside the store, with the password from
TUNELAB_UI_ADMIN_PASSWORD (or MLflow's MLFLOW_AUTH_ADMIN_PASSWORD) or typed at a prompt: there is
no default. tunelab-ui hashes it into that database itself, through MLflow's own bootstrap, and
then drops it: the server's command line, environment, ini file and logs never hold it. The ini
and the database are owner-only whatever the umask.
"""

from __future__ import annotations

import configparser
import getpass
import importlib.util
import io
import os
import secrets
import sqlite3
import sys
import warnings
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError

PASSWORD_VARS = ("TUNELAB_UI_ADMIN_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD")  # first set one wins
DEFAULT_ADMIN = "admin"
OWNER_ONLY = 0o600
AUTH_CACHE_SECONDS = 60


@dataclass(frozen=True)
class AuthFiles:
    """The generated ini (``MLFLOW_AUTH_CONFIG_PATH``) and the user database, beside the store."""

    ini: Path
    db: Path

    @classmethod
    def beside(cls, store_folder: Path, stem: str = "mlflow") -> AuthFiles:
        return cls(store_folder / f"{stem}-auth.ini", store_folder / f"{stem}-auth.db")


def owner_only(path: Path, text: str | None = None) -> None:
    """Create (or rewrite, with ``text``) ``path`` readable by its owner alone, whatever the umask:
    O_CREAT's mode applies before any content exists, and chmod covers a file that was there."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if text is not None else 0)
    fd = os.open(path, flags, OWNER_ONLY)
    try:
        os.fchmod(fd, OWNER_ONLY)
        if text is not None:
            os.write(fd, text.encode())
    finally:
        os.close(fd)


def ini_text(files: AuthFiles, admin: str) -> str:
    """MLflow's basic_auth.ini with tunelab's database and admin, and no password in it."""
    config = configparser.ConfigParser()
    config["mlflow"] = {
        "default_permission": "READ",  # logged-in users read everything, write only what they own or are granted
        "database_uri": f"sqlite:///{files.db}",
        "admin_username": admin,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        # A password check (scrypt) costs about a second of CPU by design, and a run sends
        # hundreds of requests (registering a model reads every metric's history: minutes).
        # Each worker keeps a good login for this long; a password changed or a user deleted
        # through another worker is still accepted there until then.
        "auth_cache_ttl_seconds": str(AUTH_CACHE_SECONDS),
    }
    text = io.StringIO()
    text.write("# Written by tunelab-ui --auth at each start; the admin password is never stored here.\n")
    config.write(text)
    return text.getvalue()


def admin_exists(db: Path, admin: str) -> bool:
    """Whether an earlier start already created ``admin`` (read-only; a missing or empty file is no)."""
    if not db.is_file() or db.stat().st_size == 0:
        return False
    try:
        with closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as connection:
            return connection.execute("SELECT 1 FROM users WHERE username = ?", (admin,)).fetchone() is not None
    except sqlite3.Error:
        return False


def admin_password(admin: str) -> str:
    """The new admin's password: an environment variable, else a prompt on a terminal, else an error."""
    for name in PASSWORD_VARS:
        if os.environ.get(name):
            return os.environ[name]
    if not sys.stdin.isatty():
        raise TunelabError(f"--auth needs a password for the new admin user {admin!r} and there is no terminal "
                           f"to ask on: set {PASSWORD_VARS[0]} (MLflow ships no default password).")
    password = getpass.getpass(f"tunelab-ui: password for the new MLflow admin {admin!r} (12 characters or more): ")
    if getpass.getpass("tunelab-ui: the same password again: ") != password:
        raise TunelabError("the two passwords differ; run tunelab-ui --auth again.")
    return password


def create_admin(files: AuthFiles, admin: str, password: str) -> None:
    """Hash ``password`` into the auth database with MLflow's own bootstrap (its password rules,
    its refusal of the old shipped default)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_password

    try:
        _validate_password(password)  # MLflow's rule, before it names its own settings as the fix
    except MlflowException as err:
        raise TunelabError(f"the admin password is refused: {err.message} Set {PASSWORD_VARS[0]} "
                           "to a longer one.") from None
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = str(files.ini)  # read when mlflow.server.auth is imported
    with warnings.catch_warnings():  # the server prints its own import warnings
        warnings.simplefilter("ignore")
        from mlflow.server import auth
    try:
        auth.store.init_db(f"sqlite:///{files.db}")
        auth.create_admin_user(admin, password)
    except MlflowException as err:
        raise TunelabError(f"cannot create the admin user {admin!r}: {err.message}") from None


def prepare(store_folder: Path, admin: str = DEFAULT_ADMIN, stem: str = "mlflow") -> bool:
    """Write the ini, create the admin if it does not exist yet (True), and set the server's environment."""
    if importlib.util.find_spec("flask_wtf") is None:  # the basic-auth app's CSRF protection
        raise TunelabError("--auth needs MLflow's auth extra: pip install 'mlflow[auth]' (Flask-WTF).")
    files = AuthFiles.beside(store_folder, stem)
    store_folder.mkdir(parents=True, exist_ok=True)
    owner_only(files.ini, ini_text(files, admin))
    owner_only(files.db)  # SQLite keeps the mode of an existing file (and gives its journals the same)
    created = not admin_exists(files.db, admin)
    if created:
        create_admin(files, admin, admin_password(admin))
    for name in (*PASSWORD_VARS, "MLFLOW_AUTH_ADMIN_USERNAME"):  # the server never holds the password
        os.environ.pop(name, None)
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = str(files.ini)
    # Flask's key for the sign-up page's CSRF token: the server's workers share it through the
    # environment; a new one per start only logs out browser sessions of that page.
    os.environ.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_urlsafe(32))
    return created
