"""logger=tensorboard / csv / all: MLflow stays the record, and the extra Lightning loggers get the
same per-epoch metrics and hyperparameters, each job in its own output folder. A config builds
only the loggers tunelab ships, and writes nowhere outside the job's outputs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from conftest import compose_cfg, run_cli
from helpers.runs import TINY, TINY_MODEL, nothing_written, runs

from tunelab.engine.plan import validate
from tunelab.errors import TunelabError
from tunelab.tracking.extra_loggers import extra_loggers

EXTRA_PARAMS = {"logger.extra.tensorboard._target_", "logger.extra.tensorboard.name",
                "logger.extra.tensorboard.version", "logger.extra.tensorboard.default_hp_metric",
                "logger.extra.csv._target_", "logger.extra.csv.name", "logger.extra.csv.version"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One sweep of two smoke jobs with the same seed: logger=all, and logger=mlflow to compare with."""
    home = tmp_path_factory.mktemp("loggers")
    proc = run_cli(home, "-m", *TINY, "logger=all,mlflow")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, found = runs(home)
    jobs = {r.data.params["sweep.logger"]: r for r in found if "sweep.logger" in r.data.params}
    assert set(jobs) == {"all", "mlflow"}
    return client, jobs


def history(client, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def same_points(ours: list[tuple[int, float]], theirs: list[tuple[int, float]]) -> bool:
    """The same steps, and values equal to float32 precision (TensorBoard stores float32)."""
    return bool(ours) and [s for s, _ in ours] == [s for s, _ in theirs] and \
        [v for _, v in ours] == pytest.approx([v for _, v in theirs], rel=1e-6)


def folder(run) -> Path:
    return Path(run.data.tags["path.paths.output_dir"])


@pytest.mark.slow
def test_extra_loggers_leave_the_mlflow_run_as_it_was(sweep):
    client, jobs = sweep
    with_extra, alone = jobs["all"], jobs["mlflow"]
    assert with_extra.info.status == alone.info.status == "FINISHED"
    assert set(with_extra.data.metrics) == set(alone.data.metrics)
    for key in ("val/loss", "val/acc", "train/loss", "stage"):  # same seed, same run: the same curves
        ours, theirs = history(client, with_extra, key), history(client, alone, key)
        assert [s for s, _ in ours] == [s for s, _ in theirs] and ours, key
        assert [v for _, v in ours] == pytest.approx([v for _, v in theirs], rel=1e-5, abs=1e-6), key
    differing = {k for k in set(with_extra.data.params) | set(alone.data.params)
                 if with_extra.data.params.get(k) != alone.data.params.get(k)}
    assert differing == EXTRA_PARAMS | {"sweep.logger", "choice.logger"}
    assert not (folder(alone) / "tensorboard").exists() and not (folder(alone) / "csv").exists()


@pytest.mark.slow
def test_csv_has_one_row_per_epoch_with_the_val_metrics_mlflow_has(sweep):
    client, jobs = sweep
    run = jobs["all"]
    assert folder(run) != folder(jobs["mlflow"]) and folder(run).parent == folder(jobs["mlflow"]).parent
    rows = list(csv.DictReader((folder(run) / "csv" / "metrics.csv").open()))
    epochs = [r for r in rows if r["val/loss"]]
    assert [int(r["epoch"]) for r in epochs] == [0, 1]  # debug=smoke: 2 epochs
    logged = [(int(r["step"]), float(r["val/loss"])) for r in epochs]
    assert same_points(logged, history(client, run, "val/loss"))
    assert [float(r["test/acc"]) for r in rows if r["test/acc"]] == [pytest.approx(run.data.metrics["test/acc"])]
    hparams = yaml.safe_load((folder(run) / "csv" / "hparams.yaml").read_text())
    assert hparams == run.data.params  # the same hyperparameters MLflow holds


@pytest.mark.slow
def test_tensorboard_events_hold_the_val_metrics_and_stages(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    client, jobs = sweep
    run = jobs["all"]
    events = EventAccumulator(str(folder(run) / "tensorboard"))
    events.Reload()
    for key in ("val/loss", "val/acc", "stage"):
        shown = sorted((e.step, e.value) for e in events.Scalars(key))  # stage starts come after fit
        assert same_points(shown, history(client, run, key)), key
    assert len(events.Scalars("val/loss")) == 2
    assert {e.value for e in events.Scalars("stage")} == {0.0, 1.0}  # freeze, then unfreeze
    hparams = yaml.safe_load((folder(run) / "tensorboard" / "hparams.yaml").read_text())
    assert hparams == run.data.params


# -- what a config may ask for ----------------------------------------------------------------------
def test_each_choice_builds_its_loggers_inside_the_output_folder(tmp_path):
    built = {choice: extra_loggers(compose_cfg(tmp_path, [f"logger={choice}"]))
             for choice in ("mlflow", "tensorboard", "csv", "all")}
    names = {choice: [type(x).__name__ for x in loggers] for choice, loggers in built.items()}
    assert names == {"mlflow": [], "tensorboard": ["TensorBoardLogger"], "csv": ["CSVLogger"],
                     "all": ["TensorBoardLogger", "CSVLogger"]}
    assert [Path(x.log_dir) for x in built["all"]] == [tmp_path / "run" / "tensorboard", tmp_path / "run" / "csv"]
    off = extra_loggers(compose_cfg(tmp_path, ["logger=all", "logger.extra.tensorboard=null"]))
    assert [type(x).__name__ for x in off] == ["CSVLogger"]


@pytest.mark.parametrize("target", ["lightning.pytorch.loggers.WandbLogger", "lightning.pytorch.loggers.MLFlowLogger",
                                    "pytorch_lightning.loggers.CSVLogger", "tunelab.tracking.runs._RunLogger"])
def test_a_logger_tunelab_does_not_ship_is_refused(tmp_path, target):
    cfg = compose_cfg(tmp_path, ["logger=csv", f"logger.extra.csv._target_={target}"])
    with pytest.raises(TunelabError, match=r"logger\.extra\.csv\._target_=.* is outside the allowed targets"):
        validate(cfg)
    with pytest.raises(TunelabError, match="outside the allowed targets"):
        extra_loggers(cfg)  # and again where it is built


def test_another_spelling_of_a_shipped_logger_is_the_same_logger(tmp_path):
    """Positive control for the refusals above: judged by identity, not by name."""
    cfg = compose_cfg(tmp_path, ["logger=csv", "logger.extra.csv._target_=lightning.pytorch.loggers.csv_logs.CSVLogger"])
    validate(cfg)
    assert [type(x).__name__ for x in extra_loggers(cfg)] == ["CSVLogger"]


@pytest.mark.parametrize("override", ["logger.extra.csv.save_dir={tmp}/elsewhere", "logger.extra.csv.name=../../elsewhere",
                                      "logger.extra.csv.version=../../elsewhere", "logger.extra.csv.save_dir=${{paths.log_dir}}"])
def test_a_logger_may_not_write_outside_the_job_folder(tmp_path, override):
    cfg = compose_cfg(tmp_path, ["logger=csv", override.format(tmp=tmp_path)])
    with pytest.raises(TunelabError, match=r"^logger\.extra\.csv would write to .*, outside the job's output folder"):
        extra_loggers(cfg)
    inside = compose_cfg(tmp_path, ["logger=csv", "logger.extra.csv.save_dir=${paths.output_dir}/logs"])
    assert Path(extra_loggers(inside)[0].log_dir) == tmp_path / "run" / "logs" / "csv"  # a sub-folder is fine


def test_a_refused_logger_leaves_no_run(tmp_path, monkeypatch):
    from tunelab.cli.train import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_cfg(tmp_path, [*TINY_MODEL, "data.image_size=32", "logger=csv", f"logger.extra.csv.save_dir={tmp_path}"])
    with pytest.raises(TunelabError, match="outside the job's output folder") as caught:
        train(cfg)
    assert "\n" not in str(caught.value)
    nothing_written(tmp_path)


def test_an_entry_that_is_not_a_logger_is_refused(tmp_path):
    cfg = compose_cfg(tmp_path, ["logger=csv", "logger.extra.csv=3"])
    with pytest.raises(TunelabError, match=r"^logger\.extra\.csv must be a logger node with a _target_ .*got 3\.$"):
        extra_loggers(cfg)


def test_without_tensorboard_installed_one_line_and_csv_still_works(tmp_path, monkeypatch):
    from lightning.fabric.loggers import tensorboard

    monkeypatch.setattr(tensorboard, "_TENSORBOARD_AVAILABLE", False)
    monkeypatch.setattr(tensorboard, "_TENSORBOARDX_AVAILABLE", False)
    with pytest.raises(TunelabError) as caught:
        extra_loggers(compose_cfg(tmp_path, ["logger=all"]))
    message = str(caught.value)
    assert message.startswith("logger.extra.tensorboard (lightning.pytorch.loggers.TensorBoardLogger) needs a package")
    assert "\n" not in message and message.endswith("or choose logger=csv.")
    assert [type(x).__name__ for x in extra_loggers(compose_cfg(tmp_path, ["logger=csv"]))] == ["CSVLogger"]


def test_hyperparameters_withhold_values_read_from_the_environment(tmp_path, monkeypatch):
    from tunelab.config.redaction import protect
    from tunelab.tracking.runs import mlflow_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TL_FAKE_SECRET", "hunter2-SECRET-99")
    cfg = compose_cfg(tmp_path, ["logger=csv", "+logger.tags.team=${oc.env:TL_FAKE_SECRET}"])
    protect(cfg)
    with mlflow_run(cfg) as run:
        (logger,) = run.extra_loggers
        logger.save()
        params = run.client.get_run(run.run_id).data.params
    written = (Path(logger.log_dir) / "hparams.yaml").read_text()
    assert params["logger.tags.team"] == "<env.TL_FAKE_SECRET>"  # positive control: the value is a param
    assert "hunter2" not in written and yaml.safe_load(written)["logger.tags.team"] == "<env.TL_FAKE_SECRET>"


@pytest.mark.parametrize("args,message", [
    (["logger=all", "logger.extra.csv.save_dir=/tmp"], r"^logger.extra.csv would write to /tmp/csv, outside"),
    (["tune=lr_find", "tune.min_lr=1", "tune.max_lr=0.1"], r"^tune.min_lr \(1\) must be below tune.max_lr"),
])
def test_check_finds_what_only_the_run_start_used_to(tmp_path, monkeypatch, args, message):
    """--check builds the extra loggers and the LR finder, writing nothing."""
    from tunelab.engine.plan import check_command

    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    with pytest.raises(TunelabError, match=message):
        check_command(["debug=smoke", *args])
    assert not any(tmp_path.iterdir())
