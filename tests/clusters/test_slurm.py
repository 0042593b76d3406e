"""Sweeps on a real Slurm cluster (slurmctld + slurmd + slurmdbd on 127.0.0.1): one array job per
sweep, DDP ranks started by srun, and what a cancelled or timed-out job leaves behind."""

from __future__ import annotations

import shutil
import subprocess
import time
import warnings
from pathlib import Path

import pytest

from conftest import run_cli
from helpers.runs import store_uri, sweep_runs

# The node has no GPUs: a CPU trainer asks Slurm for none; one CPU per trial lets two run at once.
ON_SLURM = ["-m", "hydra/launcher=slurm", "trainer=cpu", "hydra.launcher.cpus_per_task=1", "debug=smoke"]


def sacct_states(env: dict[str, str], job: str) -> dict[str, str]:
    """Slurm's accounting of a job (an array: one line per task), JobID -> State."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "JobID,State"], env=env,
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return dict(line.split("|")[:2] for line in out.split())


def sweep_folder(home: Path) -> Path:
    (folder,) = (home / "outputs" / "multiruns").iterdir()
    return folder


@pytest.mark.slow
def test_a_grid_sweep_is_one_array_job_one_parent_and_a_child_per_task(tmp_path, slurm):
    start = time.monotonic()
    result = run_cli(tmp_path, *ON_SLURM, "optimizer.lr=1e-3,3e-4", "strategy=full,linear_probe", env=slurm)
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    parents, children = sweep_runs(store_uri(tmp_path))
    assert len(parents) == 1 and len(children) == 4
    assert all(run.info.status == "FINISHED" for run in parents + children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
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
    result = run_cli(tmp_path, *ON_SLURM, "trainer=ddp_cpu", "trainer.devices=2", "strategy=freeze_unfreeze",
                     "optimizer.lr=1e-3", *one_task, env=slurm)
    assert result.returncode == 0, result.stderr[-3000:]
    parents, children = sweep_runs(store_uri(tmp_path))
    assert len(parents) == 1 and len(children) == 1, "one MLflow run per job, not one per rank"
    (child,) = children
    assert child.info.status == "FINISHED" and "test/acc" in child.data.metrics
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
