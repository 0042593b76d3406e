"""Sweeps end to end: real Hydra multiruns, real Optuna studies, real MLflow stores and servers."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import VENV_BIN, run_cli
from helpers.runs import SMOKE_GRID, finished_sweep, store_uri, sweep_runs
from helpers.ui_server import start_ui


@pytest.mark.slow
def test_grid_multirun_is_one_parent_with_a_child_per_job(tmp_path):
    result = run_cli(tmp_path, *SMOKE_GRID, "logger.register_best=grid_best")
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = finished_sweep(store_uri(tmp_path), 4)
    combos = {(c.data.params["sweep.optimizer.lr"], c.data.params["sweep.strategy"]) for c in children}
    assert combos == {("0.001", "full"), ("0.001", "linear_probe"), ("0.0003", "full"), ("0.0003", "linear_probe")}
    assert all(c.data.tags["sweep.strategy"] == c.data.params["sweep.strategy"] for c in children)

    # The parent knows the best trial; the table printed at the end ranks the children by it.
    best = max(children, key=lambda c: c.data.metrics["val/acc"])
    assert parent.data.metrics["best/val/acc"] == pytest.approx(best.data.metrics["val/acc"])
    assert parent.data.tags["tunelab.best_run_id"] in {c.info.run_id for c in children}
    client = MlflowClient(store_uri(tmp_path))
    versions = client.search_model_versions("name='grid_best'")  # only the best trial is registered
    assert [(str(v.version), v.run_id) for v in versions] == [("1", parent.data.tags["tunelab.best_run_id"])]
    assert "registered: models:/grid_best/1" in result.stdout
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} >= {
        "sweep/trials.txt", "sweep/trials.png", "sweep/search_space.yaml"}
    assert {"config.yaml", "lr_schedule.png", "confusion_matrix.png"} <= {
        a.path for a in client.list_artifacts(children[0].info.run_id)}
    assert "sweep FINISHED: 4 trials (4 FINISHED)" in result.stdout
    table = result.stdout[result.stdout.index("sweep FINISHED"):]
    header = next(line for line in table.splitlines() if line.startswith("rank"))
    assert "optimizer.lr" in header and "strategy" in header and "val/acc" in header
    values = [float(line.split()[4]) for line in table.splitlines() if line[:1].isdigit()]
    assert len(values) == 4 and values == sorted(values, reverse=True)
    assert len(list((tmp_path / "outputs" / "multiruns").iterdir())) == 1


OPTUNA = ["-m", "debug=smoke", "hydra/sweeper=optuna", "hydra.sweeper.study_name=pruning",
          "hydra.sweeper.n_trials=6", "hydra.sweeper.sampler.name=random",
          "hydra.sweeper.pruner.n_startup_trials=1", "hydra.sweeper.pruner.n_warmup_steps=0",
          "objective=val/loss", "objective_mode=min", "trainer.max_epochs=3",
          # a useful and a hopeless learning rate: the hopeless one's loss blows up at epoch 0
          "optimizer.lr=choice(1e-9,0.05)"]


def load_study(home: Path, name: str):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    path = home / "outputs" / "optuna" / f"{name}.journal"
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(JournalFileBackend(str(path))))


@pytest.mark.slow
def test_optuna_sweep_prunes_and_resumes_after_a_kill(tmp_path):
    import optuna

    env = {**os.environ, "TUNELAB_HOME": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [str(VENV_BIN / "tunelab-train"), *OPTUNA]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    journal = tmp_path / "outputs" / "optuna" / "pruning.journal"
    deadline = time.monotonic() + 300
    try:
        while True:  # kill the sweep (as a crash would) once three trials are done
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            assert time.monotonic() < deadline, "the sweep made no progress"
            if journal.exists() and sum(t.state.is_finished() for t in load_study(tmp_path, "pruning").trials) >= 3:
                break
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {t.number: t.state for t in load_study(tmp_path, "pruning").trials if t.state.is_finished()}
    assert len(before) >= 3

    result = run_cli(tmp_path, *OPTUNA)  # the same command again
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming study 'pruning'" in result.stdout + result.stderr
    trials = load_study(tmp_path, "pruning").trials
    for number, state in before.items():  # the first session's trials are kept, not redone
        assert trials[number].state == state
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]  # killed mid-trial: FAIL, rerun
    assert all(t.state == optuna.trial.TrialState.FAIL for t in interrupted) and len(interrupted) <= 1
    assert len(finished) == 6 and len(trials) == 6 + len(interrupted)
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all(t.params["optimizer.lr"] == 0.05 for t in pruned)

    parents, children = sweep_runs(store_uri(tmp_path))
    assert len(parents) == 1, "the rerun must continue the study's parent run"
    assert parents[0].info.status == "FINISHED"
    by_trial = {int(c.data.tags["tunelab.trial"]): c for c in children}
    for trial in pruned:  # pruned, not failed, in MLflow too
        run = by_trial[trial.number]
        assert run.info.status == "KILLED" and run.data.tags["tunelab.trial_state"] == "PRUNED"
    assert parents[0].data.metrics["sweep/pruned"] == len(pruned)
    assert "PRUNED" in result.stdout


@pytest.mark.slow
def test_eight_parallel_trials_log_to_a_real_server(tmp_path):
    # a new store, MLflow's default number of server workers: the writers really run in parallel
    with start_ui(tmp_path / "server" / "mlflow.db", create=True, workers=None,
                  log_path=tmp_path / "server.log") as url:
        start = time.monotonic()
        result = run_cli(tmp_path, "-m", "debug=smoke", "hydra/launcher=joblib", "hydra.launcher.n_jobs=8",
                         "optimizer.lr=1e-3,3e-4", "strategy=full,linear_probe", "seed=1,2",
                         env={"MLFLOW_TRACKING_URI": url})
        seconds = time.monotonic() - start
        assert result.returncode == 0, result.stderr[-3000:]
        parents, children = sweep_runs(url)
    assert len(parents) == 1 and len(children) == 8
    assert len({c.info.run_id for c in children}) == 8
    assert sorted(int(c.data.tags["tunelab.job_num"]) for c in children) == list(range(8))
    assert all(c.info.status == "FINISHED" and "val/acc" in c.data.metrics for c in children)
    combos = {(c.data.params["sweep.optimizer.lr"], c.data.params["sweep.strategy"], c.data.params["sweep.seed"])
              for c in children}
    assert len(combos) == 8
    assert parents[0].info.status == "FINISHED"
    logs = result.stdout + result.stderr + (tmp_path / "server.log").read_text()
    assert "database is locked" not in logs and "OperationalError" not in logs
    assert logs.count("CPU threads (8 parallel jobs)") == 8  # the cores were divided between trials
    print(f"8 parallel trials against {url}: {seconds:.0f} s")


@pytest.mark.slow
def test_submitit_local_launcher_runs_each_job_in_its_own_process(tmp_path):
    result = run_cli(tmp_path, "-m", "debug=smoke", "hydra/launcher=submitit_local", "optimizer.lr=1e-3,3e-4")
    assert result.returncode == 0, result.stderr[-3000:]
    parents, children = sweep_runs(store_uri(tmp_path))
    assert len(parents) == 1 and len(children) == 2
    assert all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    sweep_dir = next((tmp_path / "outputs" / "multiruns").iterdir())
    assert list(sweep_dir.glob(".submitit/*/*_log.out")), "submitit wrote no job logs"


@pytest.mark.slow
def test_a_failing_trial_fails_the_sweep_but_no_parent_stays_running(tmp_path):
    result = run_cli(tmp_path, "-m", "debug=smoke", "optimizer.lr=1e-3,-1")
    assert result.returncode != 0
    assert "optimizer.lr" in result.stderr
    parents, children = sweep_runs(store_uri(tmp_path))
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    # the bad job is refused before its run starts; the good one finished and is summarised
    assert [c.info.status for c in children] == ["FINISHED"]
    assert "sweep FAILED: 1 trials" in result.stdout


def test_a_typo_in_a_searched_choice_fails_before_any_trial(tmp_path):
    start = time.monotonic()
    result = run_cli(tmp_path, "-m", "debug=smoke", "hydra/sweeper=optuna", "strategy=choice(full,fulll)")
    assert result.returncode != 0
    assert "fulll" in result.stderr
    assert not list((tmp_path / "outputs").glob("multiruns/*/0"))
    assert time.monotonic() - start < 120
