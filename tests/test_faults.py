"""Faults a long run must survive: pre-emption, NaN losses, a dead tracking server, an
unwritable output folder, concurrent sweeps. Each test runs tunelab-train as a user would."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import REPO, run_cli

PROBE_ENV = {"TUNELAB_ALLOWED_TARGETS": "fault_probe", "PYTHONPATH": str(REPO / "tests")}
TINY = ["debug=smoke", "model.arch=test_efficientnet", "model.pretrained=false", "data.image_size=32",
        "retention.enabled=false", "data.ood={}"]


def runs(root: Path, experiment: str = "tunelab"):
    client = MlflowClient(f"sqlite:///{root}/outputs/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    (last,) = sorted(root.glob("outputs/runs/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)[-1:]
    return torch.load(last, map_location="cpu", weights_only=True)["state_dict"]


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


def test_resume_auto_without_anything_to_resume_starts_a_new_run(tmp_path):
    done = run_cli(tmp_path, *TINY, "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    _, (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED" and "tunelab.resumed_from" not in run.data.tags
