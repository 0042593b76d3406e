"""DDP on CPU (gloo, 2 processes): staged unfreezing stays in sync, one MLflow run per job,
sweeps x DDP give one directory and one run per job, and a dead rank fails the job fast."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import compose_cfg, probe_env, run_cli
from tunelab.engine.build import build_parts

PROBE_ENV = probe_env("ddp_probe")
DDP_SMOKE = ["trainer=ddp_cpu", "debug=smoke"]


def runs_of(home: Path) -> list:
    client = MlflowClient(f"sqlite:///{home}/outputs/mlflow.db")
    experiment = client.get_experiment_by_name("tunelab")
    return client.search_runs([experiment.experiment_id]) if experiment else []


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["mixup=mixup_cutmix", "data.sampler=balanced", "loss=weighted_cross_entropy"]],
                         ids=["plain", "mixup-balanced-weighted"])
def test_ddp_freeze_then_unfreeze_keeps_ranks_identical_and_frozen_layers_pretrained(tmp_path, extra):
    # head for one epoch, then the top 3 groups: the 6 groups below stay frozen throughout
    # (each rank mixes its own batches from its own seed; the all-reduced update keeps them equal)
    overrides = [*DDP_SMOKE, *extra, "strategy=freeze_unfreeze", "strategy.unfreeze=3",
                 "+callbacks.probe._target_=ddp_probe.SaveRankWeights", f"+callbacks.probe.folder={tmp_path}/weights"]
    result = run_cli(tmp_path, *overrides, env=PROBE_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "re-wrapped the model for stage 'unfreeze'" in result.stdout

    rank0 = torch.load(tmp_path / "weights" / "weights_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "weights" / "weights_rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    differ = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not differ, f"the ranks drifted apart in {differ[:5]}"

    parts = build_parts(compose_cfg(tmp_path / "ref", ["strategy=freeze_unfreeze", "strategy.unfreeze=3"]))
    pretrained = parts.adapter.model.state_dict()
    groups = parts.adapter.groups
    frozen = {n for g in groups[:-4] for n in g.param_names}
    opened = {n for g in groups[-4:-1] for n in g.param_names}
    assert frozen and opened
    assert all(torch.equal(rank0[n], pretrained[n]) for n in frozen), "a frozen parameter moved"
    changed = [n for n in opened if not torch.equal(rank0[n], pretrained[n])]
    assert len(changed) > len(opened) // 2, "the unfrozen groups did not train"

    runs = runs_of(tmp_path)
    assert len(runs) == 1, "one MLflow run per job, not one per rank"
    run = runs[0]
    assert run.info.status == "FINISHED" and "val/acc" in run.data.metrics and "test/acc" in run.data.metrics
    hashes = run.data.tags["tunelab.rank_config_hashes"].split(",")
    assert hashes == [run.data.tags["tunelab.config_hash"]] * 2


@pytest.mark.slow
def test_multirun_times_ddp_gives_one_directory_and_one_run_per_job(tmp_path):
    result = run_cli(tmp_path, "-m", "optimizer.lr=1e-3,1e-4", *DDP_SMOKE)
    assert result.returncode == 0, result.stderr[-3000:]
    sweeps = list((tmp_path / "outputs" / "multiruns").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0", "1"], "a rank re-parsed the command line and started its own sweep"
    assert not (tmp_path / "outputs" / "runs").exists(), "a rank ran as a single run"
    for job in jobs:
        assert (sweeps[0] / job / "rank1.log").read_text().strip().endswith("tunelab rank: done")
    runs = runs_of(tmp_path)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 3 and len(children) == 2  # the sweep's parent + one run per job
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(c.data.params["optimizer.lr"] for c in children) == ["0.0001", "0.001"]
    for child in children:  # both ranks of each job trained the same resolved config
        assert child.data.tags["tunelab.rank_config_hashes"].split(",") == [child.data.tags["tunelab.config_hash"]] * 2
    assert children[0].data.tags["tunelab.config_hash"] != children[1].data.tags["tunelab.config_hash"]


@pytest.mark.slow
def test_a_rank_that_raises_fails_the_job_and_its_run_without_hanging(tmp_path):
    start = time.monotonic()
    result = run_cli(tmp_path, *DDP_SMOKE, "+callbacks.fail._target_=ddp_probe.FailOnRank", "+callbacks.fail.rank=1",
                     env=PROBE_ENV)
    seconds = time.monotonic() - start
    assert result.returncode != 0
    assert "rank 1 exited with code" in result.stderr
    assert seconds < 120, f"the job took {seconds:.0f} s to notice the dead rank"
    runs = runs_of(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "rank 1 exited" in runs[0].data.tags["tunelab.error"]
    rank_log = next((tmp_path / "outputs" / "runs").iterdir()) / "rank1.log"
    assert "injected failure on rank 1" in rank_log.read_text()


@pytest.mark.slow
def test_ranks_started_by_torchrun_are_joined_not_relaunched(tmp_path):
    import os
    import subprocess

    from conftest import VENV_BIN

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["TUNELAB_HOME"] = str(tmp_path)
    result = subprocess.run([str(VENV_BIN / "torchrun"), "--nproc_per_node=2", "-m", "tunelab.cli.train", *DDP_SMOKE,
                             f"hydra.run.dir={tmp_path}/outputs/runs/torchrun"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "started ranks" not in result.stdout + result.stderr  # torchrun's ranks, none of ours
    runs = runs_of(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["tunelab.rank_config_hashes"].split(",") == [runs[0].data.tags["tunelab.config_hash"]] * 2
