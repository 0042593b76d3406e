"""Faults a long run must survive: pre-emption, NaN losses, a dead tracking server, an
unwritable output folder, concurrent sweeps. Each test runs tunelab-train as a user would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import probe_env, run_cli
from helpers.runs import TINY, final_weights, runs
from helpers.cli_inprocess import run_train

PROBE_ENV = probe_env("fault_probe")


@pytest.mark.slow
def test_sigterm_saves_marks_killed_exits_143_and_resume_auto_finishes_the_same_run(tmp_path):
    """SIGTERM mid-epoch (after the stage change, with dropout and augmentation drawing random
    numbers): exit 143, run KILLED with a checkpoint; the same command + resume=auto continues
    that MLflow run and ends with exactly the weights of a run that was never interrupted."""
    recipe = [*TINY, "trainer.max_epochs=3", "trainer.limit_train_batches=4", "model.drop_rate=0.3"]
    for folder in ("reference", "preempted"):
        (tmp_path / folder).mkdir()
    reference = run_cli(tmp_path / "reference", *recipe)
    assert reference.returncode == 0, reference.stderr[-3000:]

    root = tmp_path / "preempted"
    command = [*recipe, "+callbacks.sigterm={_target_: fault_probe.SigtermAt, step: 6}"]
    stopped = run_cli(root, *command, env=PROBE_ENV)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "pre-empted (SIGTERM)" in stopped.stderr and "resume=auto" in stopped.stderr
    client, (run,) = runs(root)
    assert run.info.status == "KILLED"
    checkpoint = Path(run.data.tags["tunelab.preempted_checkpoint"])
    assert checkpoint.is_file() and checkpoint.name == "preempted.ckpt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"] == 6

    resumed = run_cli(root, *command, "resume=auto", env=PROBE_ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, (again,) = runs(root)  # still one run: the same one, now finished
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.tags["tunelab.resumed_from"] == str(checkpoint)
    assert "test/acc" in again.data.metrics
    expected, got = final_weights(tmp_path / "reference"), final_weights(root)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


@pytest.mark.slow  # trains in a real process
def test_resume_auto_without_anything_to_resume_starts_a_new_run(tmp_path):
    done = run_cli(tmp_path, *TINY, "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    _, (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED" and "tunelab.resumed_from" not in run.data.tags


@pytest.mark.slow  # trains in a real process
def test_nan_loss_fails_the_run_naming_the_step_and_the_learning_rates(tmp_path):
    result = run_cli(tmp_path, *TINY, "+callbacks.nan={_target_: fault_probe.NanAt, step: 1}", env=PROBE_ENV)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "training loss is nan at step 1" in result.stderr and "LRs: head=" in result.stderr
    _, (run,) = runs(tmp_path)
    assert run.info.status == "FAILED"
    assert "training loss is nan at step 1" in run.data.tags["tunelab.error"]


@pytest.mark.slow
def test_a_nan_trial_fails_alone_and_the_sweep_goes_on(tmp_path):
    """Two trials, one poisoned: it is FAILED, never the best; the other finishes and is the best."""
    result = run_cli(tmp_path, "-m", *TINY, "+callbacks.nan={_target_: fault_probe.NanAt, step: 999}",
                     "callbacks.nan.step=1,999", env=PROBE_ENV)
    assert result.returncode != 0  # the sweep reports that a trial failed
    client, found = runs(tmp_path)
    children = {r.data.params["sweep.callbacks.nan.step"]: r for r in found if "mlflow.parentRunId" in r.data.tags}
    (parent,) = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    assert children["1"].info.status == "FAILED" and "training loss is nan" in children["1"].data.tags["tunelab.error"]
    assert children["999"].info.status == "FINISHED"
    assert parent.data.tags["tunelab.best_run_id"] == children["999"].info.run_id
    assert "1 FAILED, 1 FINISHED" in result.stdout


def test_an_unreachable_tracking_server_fails_before_training(tmp_path):
    from tunelab.ports import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    result = run_train(tmp_path, *TINY, env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 2
    assert f"MLflow tracking server {uri} is unreachable" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("outputs/runs/*/checkpoints"))  # nothing trained


@pytest.mark.parametrize("args, env, message", [
    (["hydra.run.dir=/proc/tunelab/run"], {}, "cannot write run outputs under /proc/tunelab/run"),
    ([], {"TUNELAB_HOME": "/proc/tunelab"}, "(TUNELAB_HOME)"),
    ([], {"TUNELAB_MIN_FREE_MB": "1e12"}, "MB free on the disk of"),
])
def test_an_unwritable_or_full_output_folder_is_refused_before_anything_starts(tmp_path, args, env, message):
    result = run_train(tmp_path, *TINY, *args, env=env)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()


def _wait_for(path: Path, proc, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"training never reached {path.name}"
        time.sleep(0.2)


def _train_against(tmp_path: Path, url: str, steps: list[int]):
    import os
    import subprocess

    from conftest import VENV_BIN

    flags = tmp_path / "flags"
    flags.mkdir()
    env = {k: v for k, v in os.environ.items()}
    env.update(PROBE_ENV, TUNELAB_HOME=str(tmp_path), MLFLOW_TRACKING_URI=url)
    command = [str(VENV_BIN / "tunelab-train"), *TINY, "trainer.max_epochs=3", "trainer.limit_train_batches=4",
               f"+callbacks.pause={{_target_: fault_probe.PauseAt, folder: '{flags}', steps: {steps}}}"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, flags


@pytest.mark.slow
def test_a_server_that_dies_mid_run_and_comes_back_loses_nothing(tmp_path):
    """The server dies after step 2 and is back (same store, same port) after step 6: training
    never stops, the metrics of the outage are sent when it is back, the run ends FINISHED."""
    from tunelab.ports import free_port
    from helpers.ui_server import start_ui

    store, port = tmp_path / "server.db", free_port()
    with start_ui(store, port=port, create=True) as url:
        proc, flags = _train_against(tmp_path, url, [2, 6])
        _wait_for(flags / "paused_2", proc)
    (flags / "go_2").touch()  # the server is gone now
    _wait_for(flags / "paused_6", proc)
    with start_ui(store, port=port) as url:
        (flags / "go_6").touch()
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert "stopped answering" in out and "answers again" in out  # Hydra logs to stdout
        client = MlflowClient(url)
        (run,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
        assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics
        losses = client.get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in losses) == [3, 7, 11]  # every epoch, the outage's included


@pytest.mark.slow
def test_a_server_that_stays_down_keeps_the_results_on_disk_and_says_so(tmp_path):
    from tunelab.ports import free_port
    from helpers.ui_server import start_ui

    with start_ui(tmp_path / "server.db", port=free_port(), create=True) as url:
        proc, flags = _train_against(tmp_path, url, [2])
        _wait_for(flags / "paused_2", proc)
    (flags / "go_2").touch()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert "went down during the run and is still down; nothing is lost" in err and "Traceback" not in err
    (folder,) = tmp_path.glob("outputs/runs/*")
    assert "test/acc" in json.loads((folder / "metrics.json").read_text())
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12


@pytest.mark.slow
def test_two_sweeps_writing_to_one_store_at_once_lose_and_duplicate_nothing(tmp_path):
    """Two 3-trial sweeps started in the same second on the default SQLite store: 2 parents and
    6 children, each trial exactly once, all FINISHED, in separate output folders."""
    import os
    import subprocess

    from conftest import VENV_BIN

    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "TUNELAB_HOME": str(tmp_path)}
    procs = [subprocess.Popen([str(VENV_BIN / "tunelab-train"), "-m", *TINY, f"optimizer.lr={lrs}", f"run_name=sweep{i}"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, lrs in enumerate(["1e-3,2e-3,3e-3", "4e-3,5e-3,6e-3"])]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert "database is locked" not in out + err
    _, found = runs(tmp_path)
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and len(children) == 6
    assert sorted(r.data.params["optimizer.lr"] for r in children) == [str(x) for x in (0.001, 0.002, 0.003, 0.004, 0.005, 0.006)]
    assert all(r.info.status == "FINISHED" for r in found)
    for parent in parents:  # each sweep's children hang under its own parent
        mine = [r for r in children if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        assert len(mine) == 3
    assert len(list(tmp_path.glob("outputs/multiruns/*"))) == 2


def test_sigterm_outside_a_trainer_call_raises_at_once_and_inside_waits_for_lightning():
    """Setup and logging have no batch boundary to stop at: SIGTERM there ends the run at once
    (KILLED by mlflow_run); inside fit/test Lightning's own handler stops at the next batch."""
    import os
    import signal

    from tunelab.errors import Preempted
    from tunelab.tracking.preemption import SigtermGuard

    previous = signal.getsignal(signal.SIGTERM)
    with SigtermGuard().installed() as guard:
        with guard.lightning():
            os.kill(os.getpid(), signal.SIGTERM)  # ignored here: Lightning's handler decides
        with pytest.raises(Preempted):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is previous  # the process's own handler comes back


@pytest.mark.parametrize("overrides, message", [
    (["resume=sometimes"], "resume must be auto or null, got 'sometimes'"),
    (["resume=auto", "ckpt_path=/tmp/x.ckpt"], "resume=auto and ckpt_path are both set; give one."),
])
def test_resume_settings_that_cannot_work_are_refused(cfg_factory, overrides, message):
    from tunelab.errors import TunelabError
    from tunelab.tracking.preemption import resolve_resume

    with pytest.raises(TunelabError, match=message.replace("(", r"\(")):
        resolve_resume(cfg_factory(*TINY[1:], *overrides))


def test_an_output_root_that_is_a_file_is_refused(tmp_path):
    from tunelab.config.preflight import check_writable
    from tunelab.errors import TunelabError

    blocker = tmp_path / "outputs"
    blocker.write_text("not a folder")
    with pytest.raises(TunelabError, match=r"outputs is a file; choose another folder \(TUNELAB_HOME\)"):
        check_writable(blocker / "runs", "TUNELAB_HOME")
