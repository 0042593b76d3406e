"""Issue 19, items 7 and 10: ``resume=auto`` never follows a run tag out of the run's own
checkpoints, and it continues a run whose process was killed with SIGKILL.

Run tags are writable by any client of a shared MLflow server, so an attacker can point a
KILLED run's ``tunelab.preempted_checkpoint`` (or a crashed run's folder tags) at any file:
another config's checkpoint, a path outside the run's folder, a link or ``..`` that leads out
of it, or a pickle that runs code. Each is refused with a logged reason and never loaded; an
untampered run is still resumed (the control that makes the refusals mean something).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import VENV_BIN, compose_cfg, probe_env
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from helpers.runs import TINY, final_weights, plant_malicious_checkpoint, runs

from tunelab.errors import Preempted, TunelabError
from tunelab.tracking import tag_names
from tunelab.tracking.attempts import STALE_ENV, Heartbeat, attempt_tags, death, stale_after_s
from tunelab.tracking.preemption import STAMP_RECIPE, STAMP_RUN, recipe_hash, resolve_resume
from tunelab.tracking.runs import mlflow_run

PROBE_ENV = probe_env("fault_probe")
IN_PROCESS = [o for o in TINY if o != "debug=smoke"]  # compose_cfg adds debug=smoke itself


def save_checkpoint(path: Path, recipe: str | None, run_id: str | None, step: int = 6) -> Path:
    """A Lightning-shaped checkpoint with tunelab's stamp (what RecipeStamp writes)."""
    checkpoint = {"epoch": 1, "global_step": step, "state_dict": {"w": torch.ones(2)}}
    checkpoint.update({k: v for k, v in ((STAMP_RECIPE, recipe), (STAMP_RUN, run_id)) if v is not None})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@dataclass
class Lab:
    """One test's experiment in the module's store (a new SQLite store costs seconds), its runs
    writing under ``<home>/outputs/runs/<name>-<attempt>`` as Hydra's would."""

    home: Path
    name: str

    def compose(self, attempt: str, *overrides: str) -> DictConfig:
        return compose_cfg(self.home, [*IN_PROCESS, f"logger.experiment_name={self.name}",
                                       f"paths.output_dir={self.home}/outputs/runs/{self.name}-{attempt}", *overrides])

    def resume(self, attempt: str = "second") -> DictConfig:
        cfg = self.compose(attempt, "resume=auto")
        resolve_resume(cfg)
        return cfg

    def preempted_run(self) -> tuple[MlflowClient, str, Path]:
        """A run ended the way a SIGTERM ends it (mlflow_run's own path): KILLED, tagged with the
        stamped checkpoint it saved in its own folder."""
        cfg = self.compose("first")
        checkpoint = Path(str(cfg.paths.output_dir)) / "checkpoints" / "preempted.ckpt"
        with pytest.raises(Preempted):
            with mlflow_run(cfg) as run:
                save_checkpoint(checkpoint, recipe_hash(cfg), run.run_id)
                raise Preempted(str(checkpoint))
        return run.client, run.run_id, checkpoint

    def crashed_run(self) -> tuple[MlflowClient, str, Path]:
        """A run left RUNNING by a process that no longer exists, with its epoch's last.ckpt."""
        cfg = self.compose("first")
        with mlflow_run(cfg) as run:
            last = save_checkpoint(Path(str(cfg.paths.output_dir)) / "checkpoints" / "last.ckpt", recipe_hash(cfg),
                                   run.run_id, step=3)
        client = run.client
        client.update_run(run.run_id, status="RUNNING")
        space = client.get_run(run.run_id).data.tags[tag_names.PROCESS].rpartition("/")[0]
        client.set_tag(run.run_id, tag_names.PID, str(dead_pid()))
        client.set_tag(run.run_id, tag_names.PROCESS, f"{space}/{time.time():.2f}")
        return client, run.run_id, last


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture
def lab(home, request, monkeypatch, caplog) -> Lab:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    caplog.set_level(logging.INFO, logger="tunelab.tracking.preemption")
    return Lab(home, re.sub(r"\W+", "_", request.node.name))


def _attacks(lab: Lab, folder: Path, attacker: Path, run_id: str, recipe: str, marker: Path) -> dict:
    """Where an attacker can point the checkpoint tag, and the reason resume=auto must give."""
    other = recipe_hash(lab.compose("x", "optimizer.lr=0.5"))
    foreign = save_checkpoint(lab.home / "outputs" / "runs" / f"{lab.name}-other" / "checkpoints" / "last.ckpt",
                              other, "someone")
    link = folder / "checkpoints" / "link.ckpt"
    link.symlink_to(foreign)
    return {
        "another config's checkpoint": (foreign, "is outside the run's output folder"),
        "another config's checkpoint copied into the folder": (
            save_checkpoint(folder / "checkpoints" / "copied.ckpt", other, run_id), "saved by another config"),
        "another run's checkpoint of this config, in the folder": (
            save_checkpoint(folder / "checkpoints" / "theirs.ckpt", recipe, "another-run"), "saved by another run"),
        "a link in the folder that leads out": (link, "is outside the run's output folder"),
        "a .. path that leads out": (folder / "checkpoints" / ".." / ".." / f"{lab.name}-other" / "checkpoints" /
                                     "last.ckpt", "is outside the run's output folder"),
        "an unstamped checkpoint in the folder": (
            save_checkpoint(folder / "checkpoints" / "plain.ckpt", None, None), "carries no recipe stamp"),
        "a code-running pickle outside": (
            plant_malicious_checkpoint(attacker / "evil.ckpt", marker), "is outside the run's output folder"),
        "a code-running pickle in the folder": (
            plant_malicious_checkpoint(folder / "checkpoints" / "evil.ckpt", marker), "posix.system"),
    }


def test_a_retagged_checkpoint_is_refused_and_never_loaded(lab, tmp_path, caplog):
    """Each file the tag of a pre-empted run can be pointed at, other than the run's own
    checkpoint, is refused with a one-line reason and never unpickled; the control: with the
    tag put back, the same run resumes."""
    marker = tmp_path / "pwned"
    client, run_id, checkpoint = lab.preempted_run()
    recipe = client.get_run(run_id).data.tags["tunelab.recipe_hash"]
    attacks = _attacks(lab, checkpoint.parent.parent, tmp_path / "attacker", run_id, recipe, marker)
    for attack, (target, reason) in attacks.items():
        if "pickle" in attack:  # positive control: the planted file runs its payload when unpickled
            torch.load(target, weights_only=False)
            assert marker.exists()
            marker.unlink()
        assert target.is_file(), attack  # all the old resume=auto asked of the tag before it loaded the file
        client.set_tag(run_id, tag_names.PREEMPTED_CHECKPOINT, str(target))
        caplog.clear()
        cfg = lab.resume()
        assert cfg.get("ckpt_path") is None and cfg.get("_resume_run_id") is None, attack  # a new run instead
        (line,) = [r.getMessage() for r in caplog.records if f"not resuming run {run_id}" in r.getMessage()]
        assert reason in line and "\n" not in line, (attack, line)
        assert not marker.exists(), attack

    client.set_tag(run_id, tag_names.PREEMPTED_CHECKPOINT, str(checkpoint))
    cfg = lab.resume()
    assert cfg.ckpt_path == str(checkpoint) and cfg._resume_run_id == run_id


def test_moving_the_run_folder_tag_too_is_refused(lab, tmp_path, caplog):
    """Retagging both the folder and the checkpoint (with a stamp forged from the visible tags):
    the run's folder must lie under this command's outputs."""
    client, run_id, _ = lab.preempted_run()
    recipe = client.get_run(run_id).data.tags["tunelab.recipe_hash"]
    forged = save_checkpoint(tmp_path / "attacker" / "checkpoints" / "preempted.ckpt", recipe, run_id)
    for folder, reason in ((tmp_path / "attacker", "is not under this command's outputs"),
                           ("/", "is not under this command's outputs"), ("/x\0y", "is not a usable path")):
        client.set_tag(run_id, tag_names.OUTPUT_DIR, str(folder))
        client.set_tag(run_id, tag_names.PREEMPTED_CHECKPOINT, str(forged))
        assert lab.resume().get("ckpt_path") is None
        assert reason in caplog.text, caplog.text
        caplog.clear()


@pytest.mark.parametrize("tag", [tag_names.RESUMED_FROM, tag_names.EARLIER_OUTPUT_DIRS])
def test_a_crashed_runs_tags_cannot_point_resume_elsewhere(lab, tmp_path, caplog, tag):
    """The crash route reads more tags (earlier folders, the checkpoint an attempt resumed
    from): pointed at a code-running checkpoint elsewhere, they are refused and the run
    resumes from its own last.ckpt."""
    attacker, marker = tmp_path / "attacker", tmp_path / "pwned"
    client, run_id, last = lab.crashed_run()
    evil = plant_malicious_checkpoint(attacker / "checkpoints" / "last.ckpt", marker)
    client.set_tag(run_id, tag, str(evil if tag == tag_names.RESUMED_FROM else attacker))
    cfg = lab.resume()
    assert cfg.ckpt_path == str(last) and cfg._resume_run_id == run_id
    assert f"not resuming run {run_id} from {evil}" in caplog.text and not marker.exists()


def test_a_run_whose_process_lives_is_never_taken_over(lab, caplog):
    """RUNNING in MLflow and its process (this one) alive: resume=auto leaves it alone."""
    cfg = lab.compose("first")
    with mlflow_run(cfg) as run:
        save_checkpoint(Path(str(cfg.paths.output_dir)) / "checkpoints" / "last.ckpt", recipe_hash(cfg), run.run_id)
        assert lab.resume().get("ckpt_path") is None
    assert f"run {run.run_id} of this config is RUNNING and may be alive; leaving it alone" in caplog.text


def test_death_is_judged_by_the_os_here_and_by_the_heartbeat_elsewhere(tmp_path, monkeypatch):
    mine = attempt_tags(tmp_path)
    space = mine[tag_names.PROCESS].rpartition("/")[0]
    assert death(mine, 900) is None  # this process
    assert "is gone" in death({**mine, tag_names.PID: str(dead_pid())}, 900)
    assert "is gone" in death({**mine, tag_names.PROCESS: f"{space}/12345.00"}, 900)  # our pid, reused by another process
    now = time.time()
    elsewhere = {tag_names.PID: "7", tag_names.PROCESS: "other-host/boot1/pidns1/100.00", tag_names.HEARTBEAT: str(int(now - 60))}
    assert death(elsewhere, 900, now) is None
    assert "not been heard from for 20 min" in death({**elsewhere, tag_names.HEARTBEAT: str(int(now - 1200))}, 900, now)
    assert death({}, 900) is None and death({tag_names.HEARTBEAT: "garbage"}, 900) is None  # cannot tell: alive


def test_a_bad_heartbeat_timeout_is_one_line_before_any_run(lab, monkeypatch):
    for value in ("abc", "0", "1", "inf", "-5"):
        monkeypatch.setenv(STALE_ENV, value)
        with pytest.raises(TunelabError, match=rf"^{STALE_ENV} must be a number of minutes >= 2 .*got '{value}'\.$"):
            stale_after_s()
    with pytest.raises(TunelabError, match=STALE_ENV):  # resume=auto reads it before it looks at any run
        lab.resume()
    assert MlflowClient(f"sqlite:///{lab.home}/outputs/mlflow.db").get_experiment_by_name(lab.name) is None


def test_the_heartbeat_writes_at_most_once_per_interval_and_never_to_a_server_that_is_down():
    class Tags:
        outage = None

        def __init__(self):
            self.beats = []

        def set_tag(self, key, value):
            self.beats.append(key)

    clock = iter([0.0, 10.0, 59.0, 61.0, 100.0, 130.0]).__next__
    run = Tags()
    heartbeat = Heartbeat(run, every=60, clock=clock)
    for _ in range(3):
        heartbeat.on_train_batch_end()
    assert run.beats == [tag_names.HEARTBEAT]  # 10 and 59 s: nothing; 61 s: one beat
    run.outage = type("Down", (), {"down": True})()
    heartbeat.on_test_batch_end()  # 130 s, but the server is down
    assert run.beats == [tag_names.HEARTBEAT]


# -- a real SIGKILL ------------------------------------------------------------------------------


def start_cli(home: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """``tunelab-train`` as run_cli starts it, without waiting for it."""
    home.mkdir(parents=True, exist_ok=True)
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    environment.update({"TUNELAB_HOME": str(home), **(env or {})})
    return subprocess.Popen([str(VENV_BIN / "tunelab-train"), *args], cwd=home, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"training never reached {path.name}"
        time.sleep(0.2)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_auto_finishes_the_same_run_with_the_uninterrupted_weights(tmp_path):
    """kill -9 in epoch 1 (after epoch 0's last.ckpt, with dropout and augmentation drawing random
    numbers, across the stage change): the run is left RUNNING; the same command plus
    resume=auto takes it, continues it from last.ckpt, ends it FINISHED, marks the lost steps,
    and ends with exactly the weights of a run that was never interrupted. A code-running
    checkpoint an attacker tagged onto the dead run is refused on the way."""
    recipe = [*TINY, "trainer.max_epochs=2", "trainer.limit_train_batches=3", "model.drop_rate=0.3"]
    reference = start_cli(tmp_path / "reference", *recipe)  # in parallel: only its final weights matter
    root, flags, marker = tmp_path / "crashed", tmp_path / "flags", tmp_path / "pwned"
    flags.mkdir()
    command = [*recipe, f"+callbacks.pause={{_target_: fault_probe.PauseAt, folder: '{flags}', steps: [4]}}"]
    crashing = start_cli(root, *command, env=PROBE_ENV)
    wait_for(flags / "paused_4", crashing)  # epoch 1, one batch in
    (folder,) = (root / "outputs" / "runs").iterdir()
    last = folder / "checkpoints" / "last.ckpt"
    assert last.is_file()
    crashing.kill()  # SIGKILL: no handler, no checkpoint, no goodbye to MLflow
    crashing.communicate()
    assert crashing.returncode == -9
    client, (run,) = runs(root)
    assert run.info.status == "RUNNING"
    stamp = torch.load(last, map_location="cpu", weights_only=True)
    assert stamp[STAMP_RECIPE] == run.data.tags["tunelab.recipe_hash"] and stamp[STAMP_RUN] == run.info.run_id
    evil = plant_malicious_checkpoint(folder / "checkpoints" / "newer.ckpt", marker)
    client.set_tag(run.info.run_id, tag_names.RESUMED_FROM, str(evil))

    (flags / "go_4").touch()
    resumed = start_cli(root, *command, "resume=auto", env=PROBE_ENV)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"Restoring states from the checkpoint path at {last}" in out + err  # step 3, not from scratch
    assert "posix.system" in out + err and not marker.exists()  # refused, never unpickled
    client, (again,) = runs(root)
    tags = again.data.tags
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert tags[tag_names.RESUMED_FROM] == str(last) and tags[tag_names.EARLIER_OUTPUT_DIRS] == str(folder)
    assert tags[tag_names.PID] == str(resumed.pid) and tags[tag_names.OUTPUT_DIR] != str(folder)
    assert f"pid {crashing.pid}" in tags["tunelab.lost_attempts"]
    assert f"after step {stamp['global_step']}" in tags["tunelab.lost_attempts"]
    assert [m.step for m in client.get_metric_history(again.info.run_id, "resumed")] == [stamp["global_step"]]
    assert "test/acc" in again.data.metrics

    assert reference.wait(timeout=600) == 0, reference.communicate()[1][-3000:]
    expected, got = final_weights(tmp_path / "reference"), final_weights(root)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
