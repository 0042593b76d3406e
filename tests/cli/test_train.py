"""Real fine-tunes (real Trainer, real MLflow store) under debug=smoke, and their failure paths."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from mlflow.tracking import MlflowClient

from tunelab.cli.train import train
from tunelab.config import conf_dir
from tunelab.engine.module import FineTuneModule
from tunelab.errors import TunelabError
from conftest import VENV_BIN, only_run, run_cli, skip_without_fashion
from helpers.cli_inprocess import run_train

pytestmark = pytest.mark.slow


def test_smoke_run_is_fully_tracked(cfg_factory):
    cfg = cfg_factory()
    metrics = train(cfg)
    client, run = only_run(cfg)
    assert run.info.status == "FINISHED"
    for key in ("val/acc", "val/f1", "val/precision", "val/recall", "val/loss",
                "test/acc", "test/f1", "test/precision", "test/recall", "train/loss", "lr/head", "stage"):
        assert key in run.data.metrics, key
        assert 0.0 <= run.data.metrics[key] or key.endswith("loss")
    assert metrics["test/acc"] == pytest.approx(run.data.metrics["test/acc"])
    # the stage index at each epoch end and at each stage's first step: 0 from step 0, then 1
    history = sorted(client.get_metric_history(run.info.run_id, "stage"), key=lambda m: (m.step, m.timestamp))
    assert history[0].step == 0 and [v for i, v in enumerate(m.value for m in history)
                                      if i == 0 or v != history[i - 1].value] == [0.0, 1.0]
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2
    params = run.data.params
    assert params["model.arch"] == "tf_efficientnet_lite0" and params["strategy.head_epochs"] == "1"
    assert run.data.tags["tunelab.config_hash"] and "mlflow.source.git.commit" in run.data.tags
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "stage_table.txt", "checkpoints"} <= artifacts
    (ckpt,) = client.list_artifacts(run.info.run_id, "checkpoints")
    assert ckpt.path.endswith(".ckpt") and ckpt.file_size > 1_000_000
    config_text = client.download_artifacts(run.info.run_id, "config.yaml")
    assert "tf_efficientnet_lite0" in open(config_text).read()


def test_issue_override_example_runs(cfg_factory):
    """The README's override example, shrunk to a few batches: every choice in it is real."""
    skip_without_fashion()
    cfg = cfg_factory("model=resnet18", "data=fashion_mnist", "strategy=full", "optimizer=sgd",
                      "optimizer.lr=0.01", "trainer.max_epochs=3", "data.max_train_samples=64")
    metrics = train(cfg)
    _, run = only_run(cfg)
    assert run.info.status == "FINISHED" and "test/acc" in metrics
    assert run.data.params["optimizer._target_"] == "torch.optim.SGD" and run.data.params["model.arch"] == "resnet18"
    assert len(MlflowClient(str(cfg.logger.tracking_uri)).get_metric_history(run.info.run_id, "val/acc")) == 3


def test_training_error_marks_run_failed(cfg_factory, monkeypatch):
    def explode(self, batch, batch_idx):
        raise RuntimeError("boom in training_step")

    monkeypatch.setattr(FineTuneModule, "training_step", explode)
    cfg = cfg_factory()
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg)
    _, run = only_run(cfg)
    assert run.info.status == "FAILED"
    assert "boom in training_step" in run.data.tags["tunelab.error"]


def test_nan_loss_stops_with_step_and_lrs(cfg_factory):
    cfg = cfg_factory("optimizer.lr=1e30", "scheduler=constant", "strategy=full")
    with pytest.raises(TunelabError, match=r"training loss is nan at step \d+ .*LRs: .*head="):
        train(cfg)
    _, run = only_run(cfg)
    assert run.info.status == "FAILED"


def test_bad_config_fails_before_any_run(cfg_factory):
    cfg = cfg_factory("optimizer.lr=0")
    with pytest.raises(TunelabError, match="optimizer.lr must be > 0"):
        train(cfg)
    cfg = cfg_factory("strategy.head_epochs=5", "compress_stages=false")  # smoke would squeeze it in
    with pytest.raises(TunelabError, match="trainer.max_epochs=2"):
        train(cfg)
    assert not os.path.exists(cfg.paths.log_dir + "/mlflow.db"), "no half-made run is left behind"


def test_step_stage_past_the_end_is_rejected_before_the_first_step(cfg_factory):
    cfg = cfg_factory("strategy=gradual", "strategy.unit=step", "strategy.every=50", "compress_stages=false")
    with pytest.raises(TunelabError, match=r"starts at step \d+ but the run has only 4 optimizer steps"):
        train(cfg)
    _, run = only_run(cfg)
    assert run.info.status == "FAILED" and "stage_table.txt" in {a.path for a in MlflowClient(
        str(cfg.logger.tracking_uri)).list_artifacts(run.info.run_id)}


@pytest.mark.slow  # trains in a real process
def test_cli_run_prints_store_and_ui_command(tmp_path):
    result = run_cli(tmp_path, "debug=smoke", "strategy=linear_probe", "trainer.max_epochs=1")
    assert result.returncode == 0, result.stderr[-2000:]
    store = tmp_path / "outputs" / "mlflow.db"
    assert store.is_file()
    assert f"MLflow store: sqlite:///{store}" in result.stdout
    assert f"tunelab-ui --store {store}" in result.stdout
    (log,) = (tmp_path / "outputs" / "runs").glob("*/train.log")
    assert "linear_probe" in log.read_text() and (log.parent / ".hydra" / "config.yaml").is_file()


@pytest.mark.parametrize("args,code,message", [
    (["model.arch=resnet_18"], 2, "tunelab-train: error: model.arch='resnet_18' is not a timm architecture. Did you mean"),
    (["data=image_folder", "data.source.root=/no/such/dir"], 2, "folder /no/such/dir does not exist"),
    (["data=image_folder"], 2, "data.source.root must be set"),
    (["model=resnet18", "model.pretrained=true"], 2, "no local weights exist for 'resnet18'"),
    (["model=no_such_model"], 2, "Could not find 'model/no_such_model'"),
    (["optimizer.lrr=0.1"], 2, "optimizer.lrr"),
])
def test_cli_bad_input_exits_nonzero_with_one_clear_line(tmp_path, args, code, message):
    result = run_train(tmp_path, "debug=smoke", *args)
    assert result.returncode == code, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_csv_without_label_column(tmp_path, image_folder):
    csv = image_folder / "labels.csv"
    csv.write_text("path,y\n" + "".join(f"{p},a\n" for p in sorted(image_folder.rglob("*.png"))))
    result = run_train(tmp_path, "debug=smoke", "data=image_csv", f"data.source.path={csv}")
    assert result.returncode == 2
    assert "has no column 'label' (columns: path, y). Set data.source.label_column=<column name>." in result.stderr


def test_cli_num_classes_smaller_than_labels(tmp_path, image_folder):
    result = run_train(tmp_path, "debug=smoke", "data=image_folder", f"data.source.root={image_folder}", "data.num_classes=2")
    assert result.returncode == 2
    assert "data.num_classes=2 but" in result.stderr and "Set data.num_classes=3" in result.stderr


@pytest.mark.slow  # trains in a real process
def test_user_config_from_searchpath_without_editing_python(tmp_path, image_folder):
    """A model choice in the user's own folder, given with hydra.searchpath, trains for real."""
    own = tmp_path / "my_conf" / "model"
    own.mkdir(parents=True)
    (own / "my_resnet.yaml").write_text(
        "_target_: tunelab.adapters.timm.timm_adapter\narch: resnet10t\npretrained: false\n"
    )
    result = run_cli(tmp_path, f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "model=my_resnet",
                  "data=image_folder", f"data.source.root={image_folder}", "debug=smoke", "trainer.max_epochs=1",
                  "strategy=full")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "timm resnet10t (random init, new 3-output head" in result.stdout


def test_cli_help_lists_groups():
    result = subprocess.run([str(VENV_BIN / "tunelab-train"), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    listed = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line and not line.startswith(" "))
    for group in ("model", "data", "strategy", "scheduler", "experiment"):
        folder = conf_dir() / group
        assert sorted(listed[group].split(", ")) == sorted(p.stem for p in folder.glob("*.yaml")), group


def test_ctrl_c_marks_run_killed_not_finished(tmp_path):
    environment = {**os.environ, "TUNELAB_HOME": str(tmp_path)}
    environment.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [str(VENV_BIN / "tunelab-train"), "debug=smoke", "trainer.limit_train_batches=10000", "strategy=full"],
        cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A terminal's Ctrl+C: SIGINT at its default even when pytest itself was started in the
        # background by a shell (which ignores SIGINT, and exec keeps ignored signals ignored).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        for line in proc.stdout:  # wait until training has started
            if "optimizer steps" in line:  # StageCallback's line at the start of fit
                break
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never leave a training process behind when the test fails
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted; the MLflow run is marked KILLED" in stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    assert run.info.status == "KILLED"


def test_a_bad_loss_is_caught_within_the_check_window_naming_its_own_step(cfg_factory, monkeypatch):
    """The loss is read on the host once per LOSS_CHECK_EVERY steps (a read per step stalls a
    GPU): the run still fails within that window, naming the step where the loss went bad."""
    from tunelab.engine.loss_watch import LOSS_CHECK_EVERY

    steps_run, real_loss = [], FineTuneModule._loss

    def loss_going_bad_at_step_3(self, logits, y):
        steps_run.append(self.global_step)
        loss = real_loss(self, logits, y)
        return loss * float("nan") if self.global_step == 3 else loss

    monkeypatch.setattr(FineTuneModule, "_loss", loss_going_bad_at_step_3)
    cfg = cfg_factory("trainer.limit_train_batches=40", "trainer.max_epochs=1", "strategy=full", "scheduler=constant")
    with pytest.raises(TunelabError, match=r"training loss is nan at step 3 \(epoch 0\); LRs: .*head="):
        train(cfg)
    assert 3 < max(steps_run) < LOSS_CHECK_EVERY  # failed at the window's end, not the epoch's
    _, run = only_run(cfg)
    assert run.info.status == "FAILED"


def test_the_test_confusion_matrix_is_gathered_inside_the_test_loop(cfg_factory, monkeypatch):
    """After trainer.test() the module is back on the CPU, and NCCL cannot gather CPU tensors:
    computed there, the confusion matrix failed every GPU DDP run (scripts/gpu_check.py's DDP
    smoke on an H200). It is gathered in on_test_epoch_end, on the test device, and train()
    logs that result."""
    import inspect

    from torchmetrics.classification import MulticlassConfusionMatrix

    called_from, real_compute = [], MulticlassConfusionMatrix.compute

    def spy(self):
        called_from.append([frame.function for frame in inspect.stack()])
        return real_compute(self)

    monkeypatch.setattr(MulticlassConfusionMatrix, "compute", spy)
    cfg = cfg_factory()
    train(cfg)
    assert called_from and all("on_test_epoch_end" in stack for stack in called_from)
    client, run = only_run(cfg)
    assert "confusion_matrix.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
