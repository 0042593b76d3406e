"""A team's setup on one machine: PostgreSQL behind `tunelab-ui` (the tracking server many
trials write to at once) and behind an Optuna study that two machines' sweeps share. The role
has a password, and it must appear nowhere: not in any output, log, file or MLflow record."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, VENV_BIN, run_cli
from helpers.runs import sweep_runs
from helpers.ui_server import start_ui

sys.path.insert(0, str(REPO / "scripts"))
from clusters.postgres import another_database, pg_bin, postgres_server  # noqa: E402

PASSWORD = f"pw-{secrets.token_hex(8)}"  # a new one per session: found only if something leaked it
SERVER_ERRORS = re.compile(r"Traceback|OperationalError|IntegrityError|\bERROR\b|HTTP/1\.1\" 5\d\d")
GRID = ["-m", "debug=smoke", "optimizer.lr=1e-3,3e-4", "strategy=full,linear_probe", "seed=1,2"]


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A PostgreSQL that cannot start fails these tests with its reason (pg_bin says what to install)."""
    folder = tmp_path_factory.mktemp("postgres")
    with postgres_server(folder, password=PASSWORD) as uri:
        yield uri, folder


@pytest.fixture(scope="module")
def server(postgres):
    """tunelab-ui on the PostgreSQL store, MLflow's default number of workers: real parallel writers."""
    uri, folder = postgres
    log = folder / "ui.log"
    with start_ui(None, backend_store_uri=uri, workers=None, log_path=log, artifacts=folder / "mlartifacts") as url:
        yield url, log


def _leaks(*texts: str, folders: tuple[Path, ...] = ()) -> list[str]:
    """Where the password shows: in the given texts, or in any file under ``folders``."""
    spellings = [PASSWORD.encode(), quote(PASSWORD, safe="").encode()]
    found = [f"text {i}" for i, text in enumerate(texts) if any(s.decode() in text for s in spellings)]
    for folder in folders:
        found += [str(p) for p in folder.rglob("*") if p.is_file() and any(s in p.read_bytes() for s in spellings)]
    return found


def _dump(uri: str) -> str:
    """The whole database as SQL text: every table an MLflow or Optuna record can sit in."""
    database = uri.rsplit("/", 1)[1]
    port = uri.rsplit(":", 1)[1].split("/")[0]
    proc = subprocess.run([str(pg_bin() / "pg_dump"), "-h", "127.0.0.1", "-p", port, "-U", "tunelab", database],
                          capture_output=True, text=True, env={**os.environ, "PGPASSWORD": PASSWORD}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _steps(client: MlflowClient, run) -> dict[str, int]:
    """How many values each metric of a run has: a lost write shows as a shorter history."""
    return {key: len(client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics}


def test_tunelab_ui_refuses_a_wrong_password_in_one_masked_line(postgres):
    uri, _ = postgres
    wrong = uri.replace(PASSWORD, f"{PASSWORD}-wrong")
    result = subprocess.run([str(VENV_BIN / "tunelab-ui"), "--backend-store-uri", wrong], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("tunelab-ui: error: cannot connect to the database") and "password authentication failed" in line
    assert ":***@127.0.0.1" in line and not _leaks(result.stdout, result.stderr)


def test_tunelab_ui_keeps_the_password_off_the_screen_and_off_the_servers_command_line(postgres, monkeypatch,
                                                                                         capsys, tmp_path):
    from tunelab.cli import ui

    uri, _ = postgres
    launched = []
    monkeypatch.setattr(ui.os, "execv", lambda path, argv: launched.append(argv))
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", "")  # restored after the test: main() sets it
    monkeypatch.chdir(tmp_path)
    ui.main(["--backend-store-uri", uri, "--port", "5123"])
    out = capsys.readouterr().out
    assert out.startswith("MLflow UI on postgresql+psycopg2://tunelab:***@127.0.0.1:") and not _leaks(out)
    (argv,) = launched
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and "--backend-store-uri" not in argv
    assert not _leaks(" ".join(argv))  # /proc/PID/cmdline is readable by every local user
    assert os.environ["MLFLOW_BACKEND_STORE_URI"] == uri.replace("postgresql://", "postgresql+psycopg2://")


def test_tunelab_ui_explains_its_database_store_in_help():
    result = subprocess.run([str(VENV_BIN / "tunelab-ui"), "--help"], capture_output=True, text=True, timeout=60)
    text = " ".join(result.stdout.split())
    assert "--backend-store-uri URI" in text and "postgresql://USER:PASSWORD@HOST:PORT/DB" in text
    assert "shown as ***" in text and "PGPASSWORD" in text


def test_when_two_sweeps_ask_for_the_last_slot_at_once_only_one_trial_is_kept():
    import optuna

    from hydra_plugins.tunelab_optuna_sweeper.study import SURPLUS, claim, counts, drop_surplus

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    for _ in range(2):
        trial = study.ask()
        claim(study, trial)
        study.tell(trial, 1.0)
    first, second = study.ask(), study.ask()  # both sweeps saw one free slot of three
    for trial in (first, second):
        claim(study, trial)
    assert drop_surplus(study, [second], 3) == []  # whichever checks first: the larger number loses
    assert drop_surplus(study, [first], 3) == [first]
    trials = study.get_trials()
    assert sum(map(counts, trials)) == 3 and trials[second.number].user_attrs[SURPLUS]
    assert trials[second.number].state == optuna.trial.TrialState.FAIL


def test_only_trials_whose_sweep_died_are_failed_as_interrupted():
    import optuna

    from hydra_plugins.tunelab_optuna_sweeper.study import ALIVE, GRACE, INTERRUPTED, OWNER, claim, fail_stale

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    gone = subprocess.Popen(["true"])
    gone.wait()
    study = optuna.create_study()
    trials = [study.ask() for _ in range(5)]
    for trial in trials[:4]:
        claim(study, trial)
    ours, dead, elsewhere, silent, unsigned = trials  # unsigned: asked a moment ago, owner not written yet
    owner = study.get_trials()[dead.number].user_attrs[OWNER]
    study._storage.set_trial_user_attr(dead._trial_id, OWNER, {**owner, "tunelab.pid": str(gone.pid)})
    far = {"tunelab.host": "other", "tunelab.pid": "1", "tunelab.process": "other/boot1/pidns1/1.00"}
    for trial in (elsewhere, silent):
        study._storage.set_trial_user_attr(trial._trial_id, OWNER, far)
    study._storage.set_trial_user_attr(silent._trial_id, ALIVE, time.time() - GRACE - 1)
    assert {t.number for t in fail_stale(study)} == {dead.number, silent.number}
    states = {t.number: (t.state.name, t.user_attrs.get(INTERRUPTED)) for t in study.get_trials()}
    assert states == {ours.number: ("RUNNING", None), dead.number: ("FAIL", True), elsewhere.number: ("RUNNING", None),
                      silent.number: ("FAIL", True), unsigned.number: ("RUNNING", None)}


@pytest.mark.slow
def test_eight_parallel_trials_log_to_a_postgres_backed_server(server, postgres, tmp_path):
    url, server_log = server
    # What one trial logs on its own, to the local SQLite store: the history a server must not lose.
    (tmp_path / "local").mkdir()
    (tmp_path / "team").mkdir()
    reference = run_cli(tmp_path / "local", "debug=smoke", "optimizer.lr=1e-3", "strategy=full", "seed=1")
    assert reference.returncode == 0, reference.stderr[-3000:]
    local = MlflowClient(f"sqlite:///{tmp_path}/local/outputs/mlflow.db")
    (expected,) = local.search_runs([local.get_experiment_by_name("tunelab").experiment_id])

    start = time.monotonic()
    result = run_cli(tmp_path / "team", *GRID, "hydra/launcher=joblib", "hydra.launcher.n_jobs=8",
                     env={"MLFLOW_TRACKING_URI": url})
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    parents, children = sweep_runs(url)
    assert len(parents) == 1 and len(children) == 8
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(int(c.data.tags["tunelab.job_num"]) for c in children) == list(range(8))
    assert parents[0].info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children)
    combos = {(c.data.params["sweep.optimizer.lr"], c.data.params["sweep.strategy"], c.data.params["sweep.seed"])
              for c in children}
    assert len(combos) == 8

    client = MlflowClient(url)
    by_strategy: dict[str, list[dict[str, int]]] = {}
    for child in children:
        assert "val/acc" in child.data.metrics and "test/acc" in child.data.metrics
        by_strategy.setdefault(child.data.params["sweep.strategy"], []).append(_steps(client, child))
    # Every trial of a strategy logs the same steps; the full fine-tuning ones what the local run logged.
    for histories in by_strategy.values():
        assert all(h == histories[0] for h in histories), histories
    assert by_strategy["full"][0] == _steps(local, expected)

    logs = result.stdout + result.stderr + server_log.read_text()
    assert not SERVER_ERRORS.search(server_log.read_text())
    assert logs.count("CPU threads (8 parallel jobs)") == 8
    assert "MLflow UI on postgresql+psycopg2://tunelab:***@127.0.0.1" in server_log.read_text()
    assert not _leaks(logs, reference.stdout, reference.stderr, folders=(tmp_path, postgres[1]))
    assert PASSWORD not in _dump(postgres[0])
    print(f"8 parallel trials against tunelab-ui on PostgreSQL: {seconds:.0f} s")


@pytest.mark.slow
def test_a_slurm_array_logs_to_the_same_postgres_backed_server(server, postgres, slurm, tmp_path):
    """The other kind of writer a team's server has: jobs of a Slurm array, on the cluster's nodes."""
    url, server_log = server
    start = time.monotonic()
    result = run_cli(tmp_path, "-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "trainer=cpu",
                     "debug=smoke", "optimizer.lr=1e-3,3e-4", "strategy=full,linear_probe",
                     env={**slurm, "MLFLOW_TRACKING_URI": url})
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    parents, children = sweep_runs(url)  # the server may hold the other tests' sweeps too
    (parent,) = [p for p in parents if Path(p.data.tags["tunelab.sweep_dir"]).is_relative_to(tmp_path)]
    mine = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(mine) == 4
    assert all(c.info.status == "FINISHED" and "val/acc" in c.data.metrics for c in mine)
    assert len({c.data.tags["tunelab.slurm_job_id"].split("_")[0] for c in mine}) == 1  # one array job
    assert not SERVER_ERRORS.search(server_log.read_text())
    assert not _leaks(result.stdout, result.stderr, folders=(tmp_path,))
    print(f"a 4-task Slurm array against tunelab-ui on PostgreSQL: {seconds:.0f} s")


def _optuna(storage: str, seed: int) -> list[str]:
    return ["-m", "debug=smoke", "hydra/sweeper=optuna", "hydra.sweeper.study_name=shared",
            "hydra.sweeper.n_trials=6", "hydra.sweeper.sampler.name=random", f"hydra.sweeper.sampler.seed={seed}",
            "hydra.sweeper.pruner.n_startup_trials=1", "hydra.sweeper.pruner.n_warmup_steps=0",
            "objective=val/loss", "objective_mode=min", "trainer.max_epochs=3", "logger.experiment_name=shared_study",
            "optimizer.lr=choice(1e-9,0.05)", f"hydra.sweeper.storage={storage}"]


@pytest.mark.slow
def test_two_machines_share_one_optuna_study(server, postgres, tmp_path):
    import optuna

    from hydra_plugins.tunelab_optuna_sweeper.study import INTERRUPTED, OWNER, SURPLUS, counts, storage

    url, server_log = server
    (tmp_path / "control.txt").write_text(f"a planted {PASSWORD}")
    assert _leaks(folders=(tmp_path,)) == [str(tmp_path / "control.txt")]  # the search finds a leak
    (tmp_path / "control.txt").unlink()
    study_uri = another_database(postgres[0], "optuna")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    machines = []
    start = time.monotonic()
    # Two machines: own home, outputs and sampler seed; one types the URL, the other reads it from
    # its environment (what scripts/clusters/postgres.py suggests)
    for name, seed, storage_arg in (("a", 1, study_uri), ("b", 2, "${oc.env:STUDY_URI}")):
        home = tmp_path / name
        home.mkdir()
        machines.append(subprocess.Popen(
            [str(VENV_BIN / "tunelab-train"), *_optuna(storage_arg, seed)], cwd=home, text=True,
            env={**env, "TUNELAB_HOME": str(home), "MLFLOW_TRACKING_URI": url, "STUDY_URI": study_uri},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True))
    outputs = [proc.communicate(timeout=900) for proc in machines]
    seconds = time.monotonic() - start
    for proc, (out, err) in zip(machines, outputs):
        assert proc.returncode == 0, err[-3000:]

    study = optuna.load_study(study_name="shared", storage=storage(study_uri))
    trials = study.get_trials(deepcopy=False)
    State = optuna.trial.TrialState
    finished = [t for t in trials if t.state in (State.COMPLETE, State.PRUNED)]
    assert len(finished) == 6 and sum(map(counts, trials)) == 6
    assert not [t for t in trials if t.state == State.RUNNING]
    assert all(t.user_attrs.get(SURPLUS) or t.user_attrs.get(INTERRUPTED) for t in trials if t.state == State.FAIL)
    owners = {int(t.user_attrs[OWNER]["tunelab.pid"]) for t in finished}
    assert owners == {proc.pid for proc in machines}, "both machines ran trials of the study"
    pruned = [t for t in trials if t.state == State.PRUNED]
    assert pruned and all(t.params["optimizer.lr"] == 0.05 for t in pruned)

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("shared_study")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("tunelab.sweep") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1, "one parent run for the study, whichever machine came first"
    assert parents[0].data.tags["tunelab.study"] == f"{study_uri.replace(PASSWORD, '***')}::shared"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    numbers = [int(c.data.tags["tunelab.trial"]) for c in children]
    assert sorted(numbers) == sorted(t.number for t in finished), "each trial ran once, on one machine"
    states = {t.number: t.state for t in finished}
    for child in children:  # pruned in MLflow too, whichever machine pruned it
        pruned_here = states[int(child.data.tags["tunelab.trial"])] == State.PRUNED
        assert child.info.status == ("KILLED" if pruned_here else "FINISHED")
        assert (child.data.tags.get("tunelab.trial_state") == "PRUNED") == pruned_here
    # the last machine to finish summarised every trial, both machines' ones
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics.get("sweep/finished", 0) + parents[0].data.metrics.get("sweep/pruned", 0) == 6
    search_space = Path(client.download_artifacts(parents[0].info.run_id, "sweep/search_space.yaml",
                                                  str(tmp_path / "download"))).read_text()
    assert ":***@127.0.0.1" in search_space or "${oc.env:STUDY_URI}" in search_space  # as the winner typed it

    texts = [text for pair in outputs for text in pair]
    assert any("PRUNED" in out for out, _ in outputs)
    assert not _leaks(*texts, server_log.read_text(), folders=(tmp_path, postgres[1]))
    saved = list(tmp_path.glob("*/outputs/multiruns/*/*/.hydra/hydra.yaml"))  # Hydra's copy of each trial's settings
    assert len(saved) == len(finished) and all("storage: ${oc.env:TUNELAB_OPTUNA_STORAGE}" in p.read_text() for p in saved)
    assert PASSWORD not in _dump(postgres[0]) and PASSWORD not in _dump(study_uri)
    print(f"one study, two machines, {len(trials)} trials ({len(pruned)} pruned): {seconds:.0f} s")
