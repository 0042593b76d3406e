"""`tunelab-train --check`, debug=smoke over every strategy, every search's plan, the notebook API,
and config mistakes that used to reach a traceback after the MLflow run existed."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, compose_cfg, run_cli, save_tiny_text_model
from helpers.runs import nothing_written
from mlflow import MlflowClient

from tunelab.config import conf_dir
from tunelab.config.compose import combinations
from tunelab.engine.plan import check_command
from tunelab.errors import TunelabError

STRATEGIES = sorted(p.stem for p in (conf_dir() / "strategy").glob("*.yaml"))
SEARCHES = sorted(p.stem for p in (conf_dir() / "hparams_search").glob("*.yaml"))
FAST = ["retention.enabled=false", "data.image_size=32"]


# -- debug=smoke shrinks every shipped strategy, every stage still runs ---------------------------
@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_smoke_finishes_every_strategy_through_every_stage(tmp_path, monkeypatch, strategy):
    from tunelab.cli.train import run_job

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_cfg(tmp_path, [f"strategy={strategy}", *FAST])
    result = run_job(cfg)
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    table = client.download_artifacts(result.run_id, "stage_table.txt", str(tmp_path))
    stages = Path(table).read_text().splitlines()[0].split()[2:]  # the header: group, params, stage@start...
    seen = {int(m.value) for m in client.get_metric_history(result.run_id, "stage")}
    assert seen == set(range(len(stages))), f"{strategy}: stages {stages}, stage metric saw {sorted(seen)}"


def test_smoke_compresses_a_schedule_longer_than_the_run_and_says_so(tmp_path):
    from tunelab.engine.build import plan_parts

    cfg = compose_cfg(tmp_path, ["strategy=gradual", *FAST])
    plan = plan_parts(cfg)
    assert "debug=smoke compressed the schedule (its last stage starts at epoch 4, beyond trainer.max_epochs=2)" in plan
    assert "head@step0" in plan and "top8@step4" in plan
    assert cfg.trainer.max_epochs == 3  # 5 stages, 2 optimizer steps per smoke epoch
    # a schedule that fits is left exactly as written
    fits = compose_cfg(tmp_path, ["strategy=freeze_unfreeze", *FAST])
    plan = plan_parts(fits)
    assert "unfreeze@ep1" in plan and "compressed" not in plan and fits.trainer.max_epochs == 2


# -- every Optuna search yields a valid plan for every combination it can draw -------------------
@pytest.mark.slow
@pytest.mark.parametrize("search", SEARCHES)
def test_every_search_combination_plans(search):
    runs, _ = combinations([f"hparams_search={search}"])
    assert len(runs) > 1, "the search's categorical choices were not expanded"
    report = check_command(["-m", f"hparams_search={search}"], deep=True)
    assert report.startswith(f"{len(runs)} sweep jobs valid"), report


def test_search_check_catches_a_schedule_that_outgrows_the_budget():
    """The bug this guards: gradual's last stage at epoch 4 with max_epochs=4 failed every such trial."""
    with pytest.raises(TunelabError, match=r"strategy=gradual.*starts at epoch 4 but trainer.max_epochs=4"):
        check_command(["-m", "hparams_search=lr_and_strategy", "trainer.max_epochs=4"], deep=True)


def test_combinations_cover_grids_and_sweeper_params():
    runs, _ = combinations(["optimizer.lr=1e-3,3e-4", "strategy=full,linear_probe", "debug=smoke"])
    assert sorted(" ".join(r) for r in runs) == sorted(
        f"debug=smoke optimizer.lr={lr} strategy={s}" for lr in ("0.001", "0.0003") for s in ("full", "linear_probe"))
    runs, _ = combinations(["hparams_search=lr_schedule"])
    assert {r[-1] for r in runs} == {f"scheduler={s}" for s in ("warmup_cosine", "constant", "linear", "one_cycle")}
    assert {r[1] for r in runs} == {"optimizer.lr=1e-05", "optimizer.lr=0.01"}  # the interval's ends


# -- --check on the command line: plan and exit 0, or one line and exit 2; nothing written --------
@pytest.mark.slow
def test_check_cli_prints_the_plan_and_writes_nothing(tmp_path):
    result = run_cli(tmp_path, "--check", "debug=smoke", "strategy=lp_ft")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "probe@step0" in result.stdout and "finetune@step1" in result.stdout
    assert "strategy=lp_ft" in result.stdout and "nothing was run or written" in result.stdout
    assert not (tmp_path / "outputs").exists()
    bad = run_cli(tmp_path, "--check", "optimizer.lr=-1")
    assert bad.returncode == 2 and bad.stderr.strip() == "tunelab-train: error: optimizer.lr must be > 0, got -1."
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("argv,pattern", [
    (["optimizer.lr=-1"], r"^optimizer\.lr must be > 0, got -1\.$"),
    (["strategy=nope"], r"Could not find 'strategy/nope'"),
    (["data=image_folder", "data.source.root=/no/such/folder"], r"/no/such/folder"),
    (["-m", "strategy=full,gradual", "trainer.max_epochs=1"], r"^sweep job 1 \(strategy=gradual\): stage 'top8' .*trainer.max_epochs=1"),
    (["+nonsense=1"], r"^top-level key 'nonsense' is not a tunelab setting"),
])
def test_check_refuses_in_one_line(argv, pattern):
    with pytest.raises(TunelabError, match=pattern) as caught:
        check_command(argv, deep=True)
    assert "\n" not in str(caught.value)


# -- config keys nothing reads, dicts splatted into library calls: one line before any run -------
def test_misplaced_package_names_the_file(tmp_path):
    user = tmp_path / "myconf"
    (user / "experiment").mkdir(parents=True)
    (user / "experiment" / "mine.yaml").write_text("optimizer:\n  lr: 0.5\n")  # no '# @package _global_'
    with pytest.raises(TunelabError, match=r"top-level key 'experiment' .*experiment=mine.*@package _global_"):
        check_command([f"hydra.searchpath=[file://{user}]", "experiment=mine"], deep=False)
    (user / "experiment" / "mine.yaml").write_text("# @package _global_\noptimizer:\n  lr: 0.5\n")
    assert "experiment=mine" in check_command([f"hydra.searchpath=[file://{user}]", "experiment=mine"], deep=False)


@pytest.mark.parametrize("overrides,pattern", [
    (["+data.augment.auto_augmnt=rand-m9"], r"^data\.augment\.auto_augmnt is not a setting of timm\..*create_transform \(it takes .*\) "
                                             r"\(did you mean auto_augment\?\)"),
    (["+model.kwargs.drop_rat=0.1"], r"^model\.kwargs for test_efficientnet rejected by timm"),
    (["+lora_config.r=4"], r"^top-level key 'lora_config' is not a tunelab setting"),
])
def test_unread_or_unknown_keys_fail_before_any_run(tmp_path, monkeypatch, overrides, pattern):
    from tunelab.cli.train import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_cfg(tmp_path, ["model.arch=test_efficientnet", "model.pretrained=false", *FAST, *overrides])
    with pytest.raises(TunelabError, match=pattern) as caught:
        train(cfg)
    assert "\n" not in str(caught.value)
    nothing_written(tmp_path)


def test_hf_config_override_typo_is_refused(tmp_path):
    from tunelab.adapters.text import text_adapter

    path = save_tiny_text_model(tmp_path / "tiny", "bert")
    with pytest.raises(TunelabError, match=r"^model\.config_overrides\.hidden_dropout_prb is not a setting of BertConfig "
                                           r"\(did you mean hidden_dropout_prob\?\)"):
        text_adapter(2, str(path), config_overrides={"hidden_dropout_prb": 0.2})
    assert text_adapter(2, str(path), config_overrides={"hidden_dropout_prob": 0.2}) is not None


def test_full_l2sp_turns_weight_decay_off(tmp_path):
    cfg = compose_cfg(tmp_path, ["strategy=full_l2sp"])
    assert cfg.optimizer.weight_decay == 0.0 and cfg.regularizer._target_.endswith("L2SP")
    cfg = compose_cfg(tmp_path, ["strategy=full_l2sp", "optimizer=sgd"])  # whichever optimizer
    assert cfg.optimizer.weight_decay == 0.0
    assert compose_cfg(tmp_path, ["strategy=full"]).optimizer.weight_decay > 0  # the others keep theirs


# -- the notebook API ------------------------------------------------------------------------------
@pytest.mark.slow
def test_python_api_trains_and_returns_run_and_metrics(tmp_path, monkeypatch, capsys):
    import tunelab

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    with pytest.raises(TunelabError, match="optimizer.lr must be > 0"):
        tunelab.check(["optimizer.lr=0"])
    assert "head@ep0" in tunelab.check(["debug=smoke"])
    result = tunelab.fit(["debug=smoke", "model.arch=test_efficientnet", "model.pretrained=false", *FAST,
                          "trainer.enable_progress_bar=true", "objective=val/f1"])
    client = MlflowClient(result.tracking_uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert 0.0 <= result.metrics["test/acc"] <= 1.0
    assert Path(result.output_dir).is_relative_to(tmp_path / "outputs" / "runs")
    shown = "".join(capsys.readouterr())
    assert "v_num" not in shown and "val/f1=" in shown  # the bar shows the objective, not the logger version
    with pytest.raises(TunelabError, match="tunelab-train -m"):
        tunelab.fit(["hparams_search=lr_schedule"])


def test_end_of_run_summary_lists_test_shift_and_retention():
    from tunelab.cli.train import _summary

    lines = _summary({"test/acc": 0.9, "test/f1": 0.8, "test/f1_class/3": 0.1, "ood/noise/acc": 0.7,
                      "ood/noise/acc_drop": 0.2, "retention/cka": 0.95, "retention/drift/blocks.1": 0.1,
                      "retention/drift/backbone": 0.05}, "classification")
    assert lines == ["  test: acc 0.9000, f1 0.8000", "  shifted test splits: noise 0.7000 (acc drop +0.2000)",
                     "  retention: cka 0.9500, drift/backbone 0.0500"]


def test_repo_has_no_unknown_top_level_keys_in_shipped_files():
    """Every shipped experiment composes without a stray top-level key (the misplaced-package check)."""
    from tunelab.engine.plan import check_run

    for exp in sorted((REPO / "experiments").glob("*.yaml")):
        runs, _ = combinations([f"experiment={exp.stem}"])  # its sweep axes do not add keys: one job is enough
        assert f"experiment={exp.stem}" in check_run(runs[0], deep=False)


def test_slurm_tools_installed_are_not_announced(tmp_path, monkeypatch):
    """Lightning warns that `srun` exists but is unused whenever Slurm's tools are installed;
    tunelab starts its own ranks, so the hint only misleads (a positive control proves it fires)."""
    import warnings

    from lightning.fabric.plugins.environments import SLURMEnvironment

    from tunelab.cli.train import _quiet_lightning

    (tmp_path / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with warnings.catch_warnings(record=True) as before:
        warnings.simplefilter("always")
        SLURMEnvironment._validate_srun_used()
    assert any("srun" in str(w.message) for w in before), "positive control: Lightning no longer warns"
    with warnings.catch_warnings(record=True) as after:
        warnings.simplefilter("always")
        _quiet_lightning()
        SLURMEnvironment._validate_srun_used()
    assert not [w for w in after if "srun" in str(w.message)]


def test_a_check_leaves_no_hydra_state_behind():
    """check_run sets Hydra's job state to resolve ${hydra:...}; left behind, a sweep's MULTIRUN
    mode made the next in-process run look like a sweep job (and fail on hydra.job.num)."""
    from hydra.core.hydra_config import HydraConfig

    from tunelab.tracking.sweep_job import current_job

    before = HydraConfig.instance().cfg
    check_command(["-m", "hparams_search=lr_schedule", "scheduler=constant", "optimizer.lr=1e-3"], deep=False)
    assert HydraConfig.instance().cfg is before and current_job() is None
