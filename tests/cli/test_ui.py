"""tunelab-ui starts a real `mlflow server` on 127.0.0.1; training logs to it over HTTP."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tunelab.cli import ui
from tunelab.cli.train import train
from tunelab.errors import TunelabError
from tunelab.ports import free_port
from conftest import VENV_BIN
from helpers.ui_server import start_ui


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a LISTEN socket on ``port``, read from /proc/net/tcp."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


@pytest.fixture
def ui_server(tmp_path):
    store = tmp_path / "server" / "mlflow.db"  # not where tunelab-train's local default would go
    store.parent.mkdir(parents=True)
    MlflowClient(f"sqlite:///{store}").create_experiment("already-there")
    console = tmp_path / "ui.log"
    with start_ui(store, workers=None, log_path=console) as url:
        banner = "".join(console.read_text().splitlines(keepends=True)[:2])
        yield url, int(url.rsplit(":", 1)[1]), banner


@pytest.mark.slow
def test_ui_serves_the_store_on_loopback_only(ui_server):
    url, port, banner = ui_server
    assert f"open {url}" in banner
    assert _listening_addresses(port) == {"127.0.0.1"}
    names = {e.name for e in MlflowClient(url).search_experiments()}
    assert "already-there" in names


@pytest.mark.slow
def test_training_logs_to_the_server(ui_server, cfg_factory, monkeypatch):
    url, _, _ = ui_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    cfg = cfg_factory("strategy=linear_probe", "trainer.max_epochs=1", "callbacks=none")
    train(cfg)
    client = MlflowClient(url)
    (run,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml")).read_text()
    assert "linear_probe" in config
    assert not Path(cfg.paths.log_dir, "mlflow.db").exists(), "with a server, nothing goes to the local store"


def test_dead_server_fails_fast_before_training(cfg_factory, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    cfg = cfg_factory()
    start = time.monotonic()
    with pytest.raises(TunelabError, match="unreachable.*MLFLOW_TRACKING_URI"):
        train(cfg)
    assert time.monotonic() - start < 60
    assert not Path(cfg.paths.output_dir, "checkpoints").exists()


def test_ui_refuses_a_missing_store(tmp_path):
    result = subprocess.run([str(VENV_BIN / "tunelab-ui"), "--store", str(tmp_path / "none.db")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "no MLflow store at" in result.stderr and "tunelab-train" in result.stderr


def test_ui_binds_loopback_by_default_and_warns_otherwise(tmp_path, monkeypatch, capsys):
    store = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{store}").search_experiments()  # creates the store
    launched = []
    monkeypatch.setattr(ui.os, "execv", lambda path, argv: launched.append(argv))
    ui.main(["--store", str(store)])
    assert launched[-1][launched[-1].index("--host") + 1] == "127.0.0.1"
    assert "warning" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--allow-remote"):
        ui.main(["--store", str(store), "--host", "0.0.0.0", "--port", "5123"])
    assert len(launched) == 1  # refused before starting anything
    with pytest.raises(SystemExit, match="--allow-remote needs --auth"):  # tests/cli/test_ui_auth.py serves it with --auth
        ui.main(["--store", str(store), "--host", "0.0.0.0", "--port", "5123", "--allow-remote"])
    assert len(launched) == 1


def test_ui_creates_a_new_store_only_when_asked(tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(ui.os, "execv", lambda path, argv: launched.append(argv))
    store = tmp_path / "new" / "mlflow.db"
    with pytest.raises(SystemExit, match="--create"):
        ui.main(["--store", str(store)])
    ui.main(["--store", str(store), "--create", "--workers", "2"])
    argv = launched[-1]
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{store}" and store.parent.is_dir()
    assert argv[argv.index("--workers") + 1] == "2"


def test_ui_prints_a_link_to_the_runs_table_of_the_experiment_trained_in_last(cfg_factory, monkeypatch, capsys):
    """Not MLflow 3's GenAI landing page: the classic runs table, in the view tunelab saved."""
    from tunelab.tracking.runs import mlflow_run

    cfg = cfg_factory()
    with mlflow_run(cfg) as run:
        pass
    store = Path(str(cfg.logger.tracking_uri)[len("sqlite:///"):])
    monkeypatch.setattr(ui.os, "execv", lambda path, argv: None)
    ui.main(["--store", str(store), "--port", "5123"])
    view = MlflowClient(run.tracking_uri).get_experiment(run.experiment_id).tags["tunelab.view"]
    page = f"#/experiments/{run.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={view}"
    assert f"open http://127.0.0.1:5123/{page} in a browser" in capsys.readouterr().out
    ui.main(["--store", str(store), "--port", "5123", "--experiment", "no-such-experiment"])
    assert "open http://127.0.0.1:5123/ in a browser" in capsys.readouterr().out
