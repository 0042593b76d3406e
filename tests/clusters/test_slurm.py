"""Sweeps on a real Slurm cluster (slurmctld + slurmd + slurmdbd on 127.0.0.1): one array job per
sweep, DDP ranks started by srun, and what a cancelled or timed-out job leaves behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch

from conftest import VENV_BIN, probe_env, run_cli
from helpers.runs import TINY, finished_sweep, store_uri, sweep_runs

# The node has no GPUs: a CPU trainer asks Slurm for none; one CPU per trial lets two run at once.
SLURM = ["-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1"]
ON_SLURM = [*SLURM, "trainer=cpu", "debug=smoke"]
# A long job whose pace each attempt sets (fault_probe.SlowSteps sleeps TUNELAB_PROBE_STEP_S per step).
SLOW = [*SLURM, "trainer=cpu", *TINY, "+callbacks.slow._target_=fault_probe.SlowSteps"]


def sacct_states(env: dict[str, str], job: str) -> dict[str, str]:
    """Slurm's accounting of a job (an array: one line per task), JobID -> State ("CANCELLED by 0"
    -> CANCELLED)."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "JobID,State"], env=env,
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return {job_id: state.split()[0] for job_id, state in (line.split("|")[:2] for line in out.splitlines())}


def sweep_folder(home: Path) -> Path:
    (folder,) = (home / "outputs" / "multiruns").iterdir()
    return folder


@pytest.mark.slow
def test_a_grid_sweep_is_one_array_job_one_parent_and_a_child_per_task(tmp_path, slurm):
    start = time.monotonic()
    result = run_cli(tmp_path, *ON_SLURM, "optimizer.lr=1e-3,3e-4", "strategy=full,linear_probe", env=slurm)
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    _, children = finished_sweep(store_uri(tmp_path), 4)
    combos = {(c.data.params["sweep.optimizer.lr"], c.data.params["sweep.strategy"]) for c in children}
    assert len(combos) == 4

    # one array job: each child records its task, which Slurm's own accounting knows as COMPLETED
    job_ids = sorted(c.data.tags["tunelab.slurm_job_id"] for c in children)
    arrays = {job_id.split("_")[0] for job_id in job_ids}
    assert len(arrays) == 1 and [j.split("_")[1] for j in job_ids] == ["0", "1", "2", "3"]
    states = sacct_states(slurm, arrays.pop())
    assert {states[j] for j in job_ids} == {"COMPLETED"}
    logs = sweep_folder(tmp_path) / ".submitit"
    for job_id in job_ids:  # each task's log in the sweep folder, free of Lightning's requeue trap
        (out,) = (logs / job_id).glob("*_log.out")
        err = out.with_name(out.name.replace("_log.out", "_log.err")).read_text()
        assert "auto-requeueing enabled" not in err and "Traceback" not in err
    print(f"4 trials as a Slurm array on {shutil.os.cpu_count()} cores: {seconds:.0f} s")


@pytest.mark.slow
@pytest.mark.parametrize("tasks", ["srun", "tunelab"])
def test_ddp_on_slurm_is_one_run_per_job_whoever_starts_the_ranks(tmp_path, slurm, tasks):
    """srun: two Slurm tasks per job, Lightning's SLURM environment joins them. tunelab: one
    Slurm task, whose process starts the second rank itself (both carry srun's rank 0)."""
    one_task = ["hydra.launcher.tasks_per_node=1", "hydra.launcher.cpus_per_task=2"] if tasks == "tunelab" else []
    result = run_cli(tmp_path, *SLURM, "debug=smoke", "trainer=ddp_cpu", "trainer.devices=2",
                     "strategy=freeze_unfreeze", "optimizer.lr=1e-3", *one_task, env=slurm)
    assert result.returncode == 0, result.stderr[-3000:]
    _, (child,) = finished_sweep(store_uri(tmp_path), 1)  # one MLflow run per job, not one per rank
    assert "test/acc" in child.data.metrics
    hashes = child.data.tags["tunelab.rank_config_hashes"].split(",")
    assert hashes == [child.data.tags["tunelab.config_hash"]] * 2
    (job_dir,) = [p for p in (sweep_folder(tmp_path) / ".submitit").iterdir() if p.is_dir()]  # one job
    rank1 = sweep_folder(tmp_path) / "0" / "rank1.log"
    rewrapped = "re-wrapped the model for stage 'unfreeze'"
    if tasks == "tunelab":  # the second rank's own log says it re-wrapped DDP for the unfreeze stage
        assert rewrapped in rank1.read_text()
    else:  # srun started both ranks (one log per Slurm task, each re-wrapped); tunelab started none
        assert not rank1.exists()
        for task in (0, 1):
            assert rewrapped in (job_dir / f"{job_dir.name}_{task}_log.out").read_text()


def wait_for_run(home: Path, matches, timeout: float = 120):
    """The first child run that ``matches``, once one exists (polling the store the sweep writes,
    once its jobs are submitted: reading a store MLflow is still creating races its migration)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list((home / "outputs" / "multiruns").glob("*/.submitit")):
            found = [c for c in sweep_runs(store_uri(home))[1] if matches(c)]
            if found:
                return found[0]
        time.sleep(1)
    raise AssertionError(f"no such run within {timeout:.0f} s")


@pytest.mark.slow
def test_scancel_kills_that_trial_only_and_leaves_no_run_running(tmp_path, slurm):
    env = {**os.environ, **slurm, **probe_env("fault_probe"), "TUNELAB_HOME": str(tmp_path),
           "TUNELAB_PROBE_STEP_S": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    sweep = subprocess.Popen([str(VENV_BIN / "tunelab-train"), *SLOW, "trainer.max_epochs=2,60"], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim = wait_for_run(tmp_path, lambda c: c.data.params.get("sweep.trainer.max_epochs") == "60"
                              and c.info.status == "RUNNING" and "tunelab.slurm_job_id" in c.data.tags)
        job_id = victim.data.tags["tunelab.slurm_job_id"]
        subprocess.run(["scancel", job_id], env=env, check=True, timeout=30)
        out, err = sweep.communicate(timeout=180)
    finally:
        sweep.kill()
    assert sweep.returncode != 0, "a sweep with a cancelled trial must not report success"
    parents, children = sweep_runs(store_uri(tmp_path))
    by_epochs = {c.data.params["sweep.trainer.max_epochs"]: c for c in children}
    assert by_epochs["2"].info.status == "FINISHED"
    cancelled = by_epochs["60"]
    assert cancelled.info.status == "KILLED" and "SIGTERM" in cancelled.data.tags["tunelab.error"]
    assert parents[0].info.status == "FAILED", "the parent of a sweep with a cancelled trial stays RUNNING"
    assert sacct_states(slurm, job_id)[job_id] == "CANCELLED"
    assert "KILLED" in out


@pytest.mark.slow
def test_a_job_at_its_time_limit_is_preempted_and_resume_auto_continues_its_run(tmp_path, slurm):
    """submitit asks for SIGUSR2 signal_delay_s before the limit, and Slurm may send it up to a
    minute early: a 2-minute limit and a 10 s delay put it 50..110 s into the job, after tunelab
    took the signal over (a shorter limit can deliver it while the job still starts up)."""
    command = [*SLOW, "trainer.max_epochs=40", "resume=auto"]  # 80 steps of 2 s: over the limit
    first = run_cli(tmp_path, *command, "hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=10",
                    env={**slurm, **probe_env("fault_probe"), "TUNELAB_PROBE_STEP_S": "2"})
    assert first.returncode != 0
    _, (child,) = sweep_runs(store_uri(tmp_path))
    assert child.info.status == "KILLED" and child.data.tags["tunelab.error"] == "pre-empted (SIGTERM)"
    checkpoint = torch.load(child.data.tags["tunelab.preempted_checkpoint"], map_location="cpu", weights_only=True)
    assert 0 < checkpoint["global_step"] < 80

    second = run_cli(tmp_path, *command, env={**slurm, **probe_env("fault_probe")})  # resubmitted, full speed
    assert second.returncode == 0, second.stderr[-3000:]
    parents, children = sweep_runs(store_uri(tmp_path))
    (resumed,) = [c for c in children if c.info.run_id == child.info.run_id]
    assert len(children) == 1 and resumed.info.status == "FINISHED", "resume=auto started a new run"
    assert resumed.data.tags["tunelab.slurm_job_id"] != child.data.tags["tunelab.slurm_job_id"]
    (last,) = Path(resumed.data.tags["tunelab.output_dir"]).glob("checkpoints/last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 80


def test_lightning_says_nothing_about_srun_when_slurm_is_merely_installed(monkeypatch):
    import lightning as L

    from tunelab.cli.train import _quiet_lightning
    from tunelab.engine.distributed import cluster_plugins

    assert shutil.which("srun"), "Slurm's client tools are not installed (scripts/setup_clusters.sh)"
    for key in ("SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_lightning()
        L.Trainer(accelerator="cpu", devices=1, logger=False, **cluster_plugins())
    assert not [w for w in caught if "srun" in str(w.message)]
