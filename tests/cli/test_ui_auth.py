"""Issue 19 item 8: registered models are code, so the server that holds them needs a login, and
what tunelab writes is its owner's alone.

1. ``tunelab-ui --auth`` runs MLflow's basic-auth app: every API route refuses an anonymous client
   (401), the admin gets in; ``--allow-remote`` without ``--auth``, and ``--auth`` with no password
   and no terminal, are refused in one line; the admin password is in no file (only hashed in the
   auth database), no console line and not even the server's environment.
2. ``tunelab-train`` logs to it with MLflow's MLFLOW_TRACKING_USERNAME / _PASSWORD, and without a
   valid login stops with one line before training.
3. Attack: without credentials, or as a logged-in user who may only read, nobody can replace the
   code of a registered model or register a version of their own; positive control: whoever can
   write does run code in whoever loads the model.
4. Stores, artifacts, output folders, checkpoints and configs are private (0600 / 0700), also
   when the calling shell's umask is 022; TUNELAB_UMASK opts out.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import stat
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import requests
from conftest import VENV_BIN, run_cli
from mlflow.tracking import MlflowClient
from helpers.runs import TINY, error_lines, train_cli

from tunelab.cli import ui
from tunelab.ports import free_port
from tunelab.umask import PRIVATE, private_files

ADMIN, ADMIN_PASSWORD = "admin", "pw-ADMIN-4c1e9b7d"  # the admin's, and the clients' MLFLOW_TRACKING_PASSWORD
MODEL = "digits"  # the model the client's run registers


def _without_mlflow_settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TUNELAB_UI_"))}


def api(url: str, method: str, path: str, auth: tuple[str, str] | None = None, **kwargs) -> requests.Response:
    return requests.request(method, url + path, auth=auth, timeout=60, **kwargs)


@contextmanager
def shell_umask(mask: int = 0o022):
    """The umask a child process starts with, as from a usual shell: tunelab must tighten it itself."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


@contextmanager
def logged_in(user: str = ADMIN, password: str = ADMIN_PASSWORD):
    """MLflow's client in this process, as ``user`` (it reads the standard variables per request)."""
    with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}):
        yield


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A real ``tunelab-ui --auth --create`` on a new store, with the admin password from the
    environment, its console kept in a file; stopped by its process group at the end."""
    folder = tmp_path_factory.mktemp("auth_server")
    store, console, port = folder / "store" / "mlflow.db", folder / "console.txt", free_port()
    env = {**_without_mlflow_settings(), "TUNELAB_UI_ADMIN_PASSWORD": ADMIN_PASSWORD}
    with console.open("w") as out, shell_umask():
        proc = subprocess.Popen([str(VENV_BIN / "tunelab-ui"), "--store", str(store), "--create", "--auth",
                                 "--port", str(port), "--workers", "1"], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:  # up when the admin's login works (every worker has loaded the auth app)
        try:
            if api(url, "GET", "/api/2.0/mlflow/experiments/search?max_results=1", auth=(ADMIN, ADMIN_PASSWORD)).ok:
                break
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"tunelab-ui --auth did not come up: {console.read_text()[-3000:]}")
        time.sleep(0.5)
    yield SimpleNamespace(url=url, store=store, console=console, proc=proc)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def client_env(url: str, user: str | None = ADMIN, password: str | None = ADMIN_PASSWORD) -> dict[str, str]:
    env = {"MLFLOW_TRACKING_URI": url}
    if user is not None:
        env |= {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}
    return env


@pytest.fixture(scope="module")
def server_run(auth_server, tmp_path_factory):
    """One tiny tunelab-train against the auth server with the admin's login, registering its model."""
    home = tmp_path_factory.mktemp("client")
    with shell_umask():
        proc = train_cli(home, f"logger.register_best={MODEL}", env=client_env(auth_server.url))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with logged_in():
        client = MlflowClient(auth_server.url)
        (run,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
        version = client.get_model_version(MODEL, "1")
        artifacts = client.get_logged_model(version.source.rsplit("/", 1)[-1]).artifact_location
    return SimpleNamespace(home=home, proc=proc, run=run, version=version, artifacts=artifacts)


def _runs_on(url: str) -> int:
    with logged_in():
        client = MlflowClient(url)
        return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))


# -- 1. the login -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_anonymous_requests_are_refused_and_the_admin_gets_in(auth_server):
    path = "/api/2.0/mlflow/experiments/search?max_results=1"
    anonymous = api(auth_server.url, "GET", path)
    assert anonymous.status_code == 401 and "Basic" in anonymous.headers["WWW-Authenticate"]
    assert api(auth_server.url, "GET", path, auth=(ADMIN, "not-the-password-1")).status_code == 401
    assert api(auth_server.url, "GET", path, auth=(ADMIN, ADMIN_PASSWORD)).status_code == 200
    assert api(auth_server.url, "GET", "/health").status_code == 200  # tunelab's reachability probe
    banner = auth_server.console.read_text()
    assert f"login required: user '{ADMIN}' (created now)" in banner and "MLFLOW_TRACKING_USERNAME=admin" in banner


@pytest.mark.slow
def test_every_api_route_refuses_an_anonymous_client(auth_server):
    """The class, not one example: each of MLflow's REST routes (tracking, registry, logged
    models, artifact upload/download/delete, multipart uploads; /api and /ajax-api), the artifact
    download routes, GraphQL, the user admin and the UI itself answer 401 without a login. Only
    /health, the UI's static files and the public server-info stay open."""
    from mlflow.server.handlers import get_endpoints

    routes = [(path, method) for path, _, methods in get_endpoints() for method in methods]
    routes += [(path, method) for path in ("/get-artifact", "/model-versions/get-artifact", "/graphql", "/signup",
                                           "/api/2.0/mlflow/users/create", "/") for method in ("GET", "POST")]
    assert len(routes) > 300 and any("mlflow-artifacts/artifacts" in p and m == "PUT" for p, m in routes)
    let_through = []
    for path, method in routes:
        concrete = re.sub(r"<[^>]+>", "x", re.sub(r"<path:[^>]+>", "1/models/m-x/artifacts/pyfunc_model.py", path))
        status = api(auth_server.url, method, concrete, json={}).status_code
        if status != 401 and not (concrete.endswith("/mlflow/server-info") and method == "GET"):
            let_through.append(f"{method} {concrete}: {status}")
    assert not let_through


# -- 2. tunelab-train with and without a login ------------------------------------------------------


@pytest.mark.slow
def test_training_logs_to_the_auth_server_with_the_standard_credentials(server_run):
    assert server_run.run.info.status == "FINISHED" and "test/acc" in server_run.run.data.metrics
    assert server_run.run.data.tags["tunelab.registered_model"] == f"{MODEL}/1"
    assert f"mlflow.pyfunc.load_model('models:/{MODEL}/1')" in server_run.proc.stdout


@pytest.mark.slow
def test_training_without_a_login_stops_in_one_line_before_anything_is_written(auth_server, tmp_path):
    """(A wrong password takes the same path: the server answers 401 to both, see above.)"""
    before = _runs_on(auth_server.url)
    proc = run_cli(tmp_path, *TINY, env=client_env(auth_server.url, None))  # not even train_cli's fake secrets
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert "refused the login (MLFLOW_TRACKING_USERNAME is not set)" in line
    assert "Set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in line and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists(), "checked before Hydra makes the output folder"
    assert _runs_on(auth_server.url) == before


# -- 3. attack: replacing a registered model's code ---------------------------------------------------

LOAD = "import sys, mlflow; mlflow.pyfunc.load_model(sys.argv[1])"


def load_as_victim(url: str, uri: str) -> subprocess.CompletedProcess:
    """What tunelab tells users to run, in a fresh process logged in as the admin."""
    env = {**_without_mlflow_settings(), **client_env(url), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(VENV_BIN / "python"), "-c", LOAD, uri], env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def model_code(url: str, artifacts: str, folder: Path) -> str:
    """The registered model's Python file as the server holds it (the file models-from-code runs)."""
    import mlflow

    with logged_in():
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{artifacts}/pyfunc_model.py",
                                                        dst_path=str(folder), tracking_uri=url)).read_text()


def replacement_attempts(artifacts: str, code: str, evil: str, run_id: str) -> dict[str, tuple[str, str, dict]]:
    """Every way to make ``models:/digits/1`` (or what its users load) run other code, as raw
    REST calls (method, path, body): overwrite or delete the model's files, upload them in
    parts, register a version from elsewhere, point an alias at it, or rename the model away."""
    folder = artifacts[len("mlflow-artifacts:/"):]
    upload = f"/api/2.0/mlflow-artifacts/artifacts/{folder}"
    other = f"mlflow-artifacts:/{folder.split('/')[0]}/evil/artifacts"
    return {
        "PUT code": ("PUT", f"{upload}/{code}", {"data": evil}),
        "PUT code (ajax)": ("PUT", f"/ajax-api/2.0/mlflow-artifacts/artifacts/{folder}/{code}", {"data": evil}),
        "PUT MLmodel": ("PUT", f"{upload}/MLmodel", {"data": "flavors: {}\n"}),
        "PUT elsewhere": ("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{other[len('mlflow-artifacts:/'):]}/{code}",
                          {"data": evil}),
        "DELETE code": ("DELETE", f"{upload}/{code}", {}),
        "multipart upload": ("POST", f"/api/2.0/mlflow-artifacts/mpu/create/{folder}/{code}",
                             {"json": {"path": code, "num_parts": 1}}),
        "new version": ("POST", "/api/2.0/mlflow/model-versions/create",
                        {"json": {"name": MODEL, "source": other, "run_id": run_id}}),
        "alias": ("POST", "/api/2.0/mlflow/registered-models/alias", {"json": {"name": MODEL, "alias": "prod", "version": "1"}}),
        "rename": ("POST", "/api/2.0/mlflow/registered-models/rename", {"json": {"name": MODEL, "new_name": "old"}}),
        "run artifact": ("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{folder.split('/')[0]}/{run_id}/artifacts/"
                                "checkpoints/epoch00.ckpt", {"data": b"not a checkpoint"}),
    }


@pytest.mark.slow
def test_without_write_permission_a_registered_model_cannot_be_replaced(auth_server, server_run, tmp_path):
    """The payload: the registered model's own Python file with two lines added that touch a
    marker. Anonymous clients (401) and a logged-in user with MLflow's default READ permission
    (403) try every route; the model's files and versions stay as they were and loading it runs
    no foreign code. Control: the admin, who may write, uploads the same file, and loading the
    model runs it. Who can write the registry runs code in whoever loads its models."""
    marker = tmp_path / "pwned"
    original_code = model_code(auth_server.url, server_run.artifacts, tmp_path / "original")
    evil = original_code + f"\nimport pathlib  # the payload\npathlib.Path({str(marker)!r}).touch()\n"
    reader = ("mallory", "pw-MALLORY-9e2a")  # MLflow's default permission for a new user: READ
    assert api(auth_server.url, "POST", "/api/2.0/mlflow/users/create", auth=(ADMIN, ADMIN_PASSWORD),
               json={"username": reader[0], "password": reader[1]}).ok
    attempts = replacement_attempts(server_run.artifacts, "pyfunc_model.py", evil, server_run.run.info.run_id)
    answers = {(who, name): api(auth_server.url, method, path, auth=auth, **body).status_code
               for who, auth in (("anonymous", None), ("reader", reader))
               for name, (method, path, body) in attempts.items()}
    assert {k: v for k, v in answers.items() if v != (401 if k[0] == "anonymous" else 403)} == {}

    with logged_in():
        client = MlflowClient(auth_server.url)
        assert [v.version for v in client.search_model_versions(f"name='{MODEL}'")] == ["1"]
        assert not client.get_registered_model(MODEL).aliases
    assert model_code(auth_server.url, server_run.artifacts, tmp_path / "kept") == original_code
    loaded = load_as_victim(auth_server.url, f"models:/{MODEL}/1")
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert not marker.exists()

    # positive control: a writer's upload is live code in the next process that loads the model
    assert api(auth_server.url, *attempts["PUT code"][:2], auth=(ADMIN, ADMIN_PASSWORD), data=evil).ok
    loaded = load_as_victim(auth_server.url, f"models:/{MODEL}/1")
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert marker.exists(), "the control payload did not run: the refusals above prove nothing"


# -- 4. the password stays secret -------------------------------------------------------------------------


def _server_processes(group: int) -> list[Path]:
    """/proc entries of the processes in ``group`` (the server, its uvicorn parent and workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[2] == str(group):
            found.append(entry)
    return found


@pytest.mark.slow
def test_the_admin_password_is_only_hashed_in_the_auth_database(auth_server, server_run):
    """Not in any file under the store's folder (store, artifacts, the generated ini), the run's
    output folder, the server's or the client's console, nor the server processes' environment;
    the auth database holds a salted hash of it."""
    folder = auth_server.store.parent
    auth_db, ini = folder / "mlflow-auth.db", folder / "mlflow-auth.ini"
    files = [p for root in (folder, server_run.home) for p in root.rglob("*") if p.is_file()]
    assert {auth_db, ini, auth_server.store} <= set(files) and any(p.suffix == ".ckpt" for p in files)
    secret = ADMIN_PASSWORD.encode()
    assert [str(p) for p in files if secret in p.read_bytes()] == []
    with sqlite3.connect(auth_db) as db:
        (stored,) = db.execute("SELECT password_hash FROM users WHERE username = ?", (ADMIN,)).fetchone()
    assert stored.startswith(("scrypt:", "pbkdf2:")) and ADMIN_PASSWORD not in stored
    assert "admin_password" not in ini.read_text()
    consoles = auth_server.console.read_text() + server_run.proc.stdout + server_run.proc.stderr
    assert ADMIN_PASSWORD not in consoles
    processes = _server_processes(auth_server.proc.pid)
    assert len(processes) >= 2  # the mlflow server and at least one worker
    assert all(secret not in (p / "environ").read_bytes() for p in processes)


# -- 5. refusals in one line -------------------------------------------------------------------------------


def run_ui(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "tunelab-ui"), *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120, env={**_without_mlflow_settings(), **(env or {})}, check=False)


@pytest.mark.parametrize("args", [["--allow-remote", "--host", "0.0.0.0"], ["--host", "0.0.0.0", "--auth"]])
def test_a_reachable_server_needs_allow_remote_and_auth(tmp_path, args):
    """--allow-remote without --auth, or another host without --allow-remote: one line, nothing
    started, nothing created (not even the auth files)."""
    proc = run_ui("--store", str(tmp_path / "mlflow.db"), "--create", "--port", "1", *args)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    needed = "--allow-remote needs --auth" if "--allow-remote" in args else "Add --allow-remote --auth"
    assert proc.stderr.startswith("tunelab-ui: error: ") and needed in proc.stderr
    assert list(tmp_path.iterdir()) == []  # refused before the store or any auth file


@pytest.mark.parametrize("password", [None, "short"])
def test_auth_without_a_usable_password_is_one_line_and_creates_no_user(tmp_path, password):
    """No TUNELAB_UI_ADMIN_PASSWORD and no terminal to prompt on (MLflow has no default either),
    or one shorter than MLflow's rule: one line, and the auth database has no user."""
    env = {"TUNELAB_UI_ADMIN_PASSWORD": password} if password else {}
    proc = run_ui("--store", str(tmp_path / "mlflow.db"), "--create", "--auth", "--port", "1", env=env)
    assert proc.returncode != 0
    (line,) = proc.stderr.strip().splitlines()
    expected = "no terminal to ask on: set TUNELAB_UI_ADMIN_PASSWORD" if password is None else "at least 12 characters"
    assert line.startswith("tunelab-ui: error: ") and expected in line
    auth_db = tmp_path / "mlflow-auth.db"
    users = sqlite3.connect(auth_db).execute("SELECT count(*) FROM users").fetchone()[0] if auth_db.stat().st_size else 0
    assert users == 0


def test_auth_files_are_owner_only_whatever_the_umask(tmp_path, monkeypatch, capsys):
    """Run in this process under a umask of 022 (as with TUNELAB_UMASK=022): the ini and the auth
    database are still 0600; the server command runs the basic-auth app without the password in
    its environment; a second start finds the admin and asks for no password."""
    for name in ("MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"):
        monkeypatch.setenv(name, "")  # recorded, so that what ui.main sets is undone afterwards
        monkeypatch.delenv(name)
    monkeypatch.setenv("TUNELAB_UI_ADMIN_PASSWORD", ADMIN_PASSWORD)
    monkeypatch.setattr("tunelab.umask.set_for_cli", lambda tool: None)  # keep the 022 set below
    launched = []
    monkeypatch.setattr(ui.os, "execv", lambda path, argv: launched.append((argv, dict(os.environ))))
    store = tmp_path / "mlflow.db"
    with shell_umask():
        ui.main(["--store", str(store), "--create", "--auth", "--host", "0.0.0.0", "--allow-remote", "--port", "5123"])
        # the first start took the password out of the environment, and there is no terminal:
        # this one would fail if it asked for a password again
        ui.main(["--store", str(store), "--create", "--auth"])
    for name in ("mlflow-auth.ini", "mlflow-auth.db"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    (first, env), _ = launched
    assert first[first.index("--app-name") + 1] == "basic-auth" and first[first.index("--host") + 1] == "0.0.0.0"
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(tmp_path / "mlflow-auth.ini")
    assert all(ADMIN_PASSWORD not in value for value in env.values())
    out = capsys.readouterr().out
    assert "(created now)" in out and "created earlier" in out and "passwords travel in clear" in out


# -- 6. private files ------------------------------------------------------------------------------------------


def _shared(root: Path) -> list[str]:
    """Entries under ``root`` (itself included) that give group or others any permission."""
    return [f"{oct(stat.S_IMODE(p.lstat().st_mode))} {p}" for p in [root, *root.rglob("*")]
            if not p.is_symlink() and stat.S_IMODE(p.lstat().st_mode) & 0o077]


@pytest.mark.slow
def test_a_run_creates_only_private_files(tmp_path):
    """A real tiny run (registering its model) from a shell whose umask is 022: the store, its
    lock, the artifacts (run and registered model), the output folder, .hydra/*.yaml, the log,
    the checkpoints and the resolved config are all owner-only."""
    home = tmp_path / "home"
    with shell_umask():
        proc = train_cli(home, f"logger.register_best={MODEL}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = home / "outputs"
    (folder,) = (outputs / "runs").iterdir()
    names = {p.relative_to(outputs).as_posix() for p in outputs.rglob("*")}
    expected = {"mlflow.db", "mlartifacts", f"runs/{folder.name}/resolved_config.yaml",
                f"runs/{folder.name}/.hydra/config.yaml", f"runs/{folder.name}/train.log",
                f"runs/{folder.name}/checkpoints/last.ckpt"}
    assert expected <= names, names
    assert any(n.endswith("/MLmodel") for n in names) and any(n.endswith("checkpoints/epoch00.ckpt") for n in names)
    assert _shared(outputs) == []


@pytest.mark.slow
def test_server_side_files_are_private(auth_server, server_run):
    """Both started from a umask of 022: what the auth server wrote (store, auth files, the run's
    artifacts, the registered model) and what the client's run wrote (its output folder)."""
    assert any(auth_server.store.parent.rglob("MLmodel")) and any(server_run.home.rglob("last.ckpt"))
    assert _shared(auth_server.store.parent) == [] and _shared(server_run.home / "outputs") == []


@pytest.mark.parametrize("setting, umask", [(None, 0o077), ("022", 0o022), ("007", 0o007)])
def test_tunelab_umask_opts_out(monkeypatch, setting, umask):
    """What a console script's first line sets: private unless TUNELAB_UMASK says otherwise."""
    from tunelab.umask import set_for_cli

    if setting is None:
        monkeypatch.delenv("TUNELAB_UMASK", raising=False)
    else:
        monkeypatch.setenv("TUNELAB_UMASK", setting)
    with shell_umask(0o022):
        set_for_cli("tunelab-x")
        assert os.umask(0o022) == umask


def test_a_bad_tunelab_umask_is_one_line_before_anything_is_written(tmp_path):
    bad = run_cli(tmp_path, *TINY, env={"TUNELAB_UMASK": "rw-r--r--"})
    assert bad.returncode == 2 and not (tmp_path / "outputs").exists()
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith("tunelab-train: error: TUNELAB_UMASK='rw-r--r--' is not an octal umask")


def test_every_console_script_sets_the_umask_first(monkeypatch):
    """A console script added later must not create shared files: each ``main`` of pyproject's
    [project.scripts] sets the umask, itself or through ``cli.common.start`` (the real runs above
    show what it does)."""
    import importlib
    import inspect
    import tomllib

    from conftest import REPO

    from tunelab.cli import common

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, function = target.split(":")
        source = inspect.getsource(getattr(importlib.import_module(module), function))
        assert f'set_for_cli("{name}")' in source or f'start("{name}")' in source, name
    called = []
    monkeypatch.setattr("tunelab.umask.set_for_cli", called.append)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    common.start("tunelab-x")
    assert called == ["tunelab-x"] and os.environ["HF_HUB_OFFLINE"] == "1"


def test_fit_keeps_the_callers_umask():
    """tunelab.fit() makes the run's files private and gives a notebook its own umask back."""
    previous = os.umask(0o022)
    try:
        with private_files():
            inside = os.umask(0o077)
        after = os.umask(0o022)
    finally:
        os.umask(previous)
    assert inside == PRIVATE and after == 0o022
