"""``tune=lr_find``: the LR range test sweeps optimizer.lr exponentially over tunelab's own param
groups (every group keeping its multiplier), suggests the steepest descent of the smoothed loss,
and leaves nothing but its own MLflow run."""

from __future__ import annotations

import math
import re

import pytest
from conftest import write_image_folder
from helpers.cli_inprocess import run_train
from helpers.runs import store_uri
from mlflow.tracking import MlflowClient

from tunelab.config import build
from tunelab.engine.lr_find import LRFinder, find_lr, steepest
from tunelab.errors import TunelabError

TINY = ["model.arch=test_efficientnet", "model.pretrained=false", "data.image_size=32", "callbacks=none"]


def _images(tmp_path) -> list[str]:
    # classes told apart by brightness, no augmentation: a curve with little noise but the batches'
    return ["data=image_folder", f"data.source.root={write_image_folder(tmp_path / 'images', per_class=12)}",
            "data.augment=null"]


def test_the_sweep_is_exponential_and_the_suggestion_is_the_steepest_descent():
    finder = LRFinder(min_lr=1e-7, max_lr=1.0, steps=141)
    lrs = [finder.lr_at(k) for k in range(141)]
    assert lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(1.0)
    assert all(b / a == pytest.approx(10 ** (7 / 140)) for a, b in zip(lrs, lrs[1:]))  # one ratio: exponential
    assert finder.lr_at(500) == pytest.approx(1.0)  # past the last step: max_lr, never beyond
    # a loss falling fastest against log LR at exactly 1e-3 (step 80), then diverging past 1e-1
    losses = [2 - math.tanh(math.log(lr / 1e-3)) + (100 * (lr - 0.1) if lr > 0.1 else 0) for lr in lrs]
    assert steepest(lrs, losses, skip_begin=14) == pytest.approx(1e-3, rel=1e-9)
    # past the lowest point training diverges: a spike and a steeper fall there (at 0.18) is chaos, not advice
    chaos = [*losses[:125], 5.0, 1.5, *losses[127:]]
    assert steepest(lrs, chaos, skip_begin=14) == pytest.approx(1e-3, rel=1e-9)
    assert steepest(lrs, [1 + lr for lr in lrs], skip_begin=14) is None  # a loss that never falls: no suggestion
    assert steepest(lrs[:4], losses[:4], skip_begin=1) is None  # two points left: too few for a slope


@pytest.mark.parametrize("overrides,scale", [
    # every group trains: layer decay 0.5 per group below the head, and the head's own multiplier 3
    (["strategy=full", "module.layer_decay=0.5", "module.group_lr_mults={head:3.0}"],
     lambda i, group, n: 0.5 ** (n - 1 - i) * (3.0 if group == "head" else 1.0)),
    # head first: 6 steps of 2 batches per epoch reach epoch 2, where training would unfreeze all;
    # the range test stays in the first stage, the backbone at LR 0 throughout
    (["strategy=freeze_unfreeze", "strategy.head_epochs=1"], lambda i, group, n: 1.0 if group == "head" else 0.0),
], ids=["full_layer_decay", "freeze_unfreeze"])
def test_every_group_keeps_its_multiplier_at_every_step(overrides, scale, cfg_factory, tmp_path):
    cfg = cfg_factory(*TINY, *overrides, "tune=lr_find", "tune.steps=6", "tune.min_lr=1e-4", "tune.max_lr=1e-2")
    finder = build(cfg.tune, "tune")
    found = find_lr(cfg, finder)
    assert [step for step, _ in found.lr_history] == list(range(6))
    for step, lrs in found.lr_history:
        groups = list(lrs)
        for i, group in enumerate(groups):  # closed form: base LR of the step × the group's multiplier
            expected = finder.lr_at(step) * scale(i, group, len(groups))
            assert lrs[group] == pytest.approx(expected, rel=1e-9), (step, group)
    assert found.run.client.get_run(found.run.run_id).data.tags["tunelab.kind"] == "lr_find"
    stages = found.run.client.download_artifacts(found.run.run_id, "stage_table.txt", str(tmp_path))
    assert f"the range test trains stage {found.stage!r} only" in open(stages).read()


def test_the_command_logs_the_plot_and_prints_an_lr_in_the_known_range(tmp_path):
    """test_efficientnet from random init on brightness-coded images, AdamW: Adam moves every weight
    by about the LR per step and the weights are O(0.1), so the loss falls fastest between 1e-4 and
    1e-1 (the usual 1e-3 default inside). The sweep spans 1e-5..3: a suggestion taken from the flat
    start or the diverged end lies outside that range. Seeds 0..7 of this setup suggested 6.8e-3..1.6e-2."""
    result = run_train(tmp_path, "debug=smoke", *TINY, *_images(tmp_path), "data.batch_size=16", "strategy=full",
                       "tune=lr_find", "tune.steps=30", "tune.min_lr=1e-5", "tune.max_lr=3", "tune.smoothing=0.8")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = re.search(r"^suggested \(steepest descent of the smoothed loss\): optimizer\.lr=(\S+)$",
                        result.stdout, re.M)
    assert printed, result.stdout
    suggested = float(printed.group(1))
    assert 1e-4 <= suggested <= 1e-1

    client = MlflowClient(store_uri(tmp_path))
    assert client.get_experiment_by_name("tunelab") is None  # no training run
    (run,) = client.search_runs([client.get_experiment_by_name("tunelab-lr_find").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["tunelab.kind"] == "lr_find"
    assert f"{run.data.metrics['lr_find/suggested_lr']:.1e}" == printed.group(1)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"lr_find.png", "lr_schedule.png", "stage_table.txt", "config.yaml"} <= artifacts
    png = client.download_artifacts(run.info.run_id, "lr_find.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    lrs = client.get_metric_history(run.info.run_id, "lr_find/lr")
    assert [m.step for m in lrs] == list(range(len(lrs))) and 10 < len(lrs) <= 30
    assert lrs[0].value == pytest.approx(1e-5) and suggested <= 1.05 * max(m.value for m in lrs)
    assert not list(tmp_path.rglob("*.ckpt"))  # the range test keeps no weights


@pytest.mark.parametrize("args,line", [
    (["tune.min_lr=0.1", "tune.max_lr=0.01"], "tune.min_lr (0.1) must be below tune.max_lr (0.01): "
                                              "the range test sweeps the LR up from one to the other."),
    (["tune.steps=2"], "tune.steps must be an integer >= 3, got 2."),
    (["tune.smoothing=1"], "tune.smoothing must be in [0, 1), got 1."),
    (["+tune.stepz=5"], "tune.stepz is not a setting of tunelab.engine.lr_find.LRFinder"),
    (["resume=auto"], "tune=lr_find starts from the model's initial weights and leaves no run to resume: drop resume="),
])
def test_bad_settings_are_one_line_before_any_run(args, line, tmp_path):
    result = run_train(tmp_path, "debug=smoke", *TINY, "tune=lr_find", *args)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [x for x in result.stderr.splitlines() if x.startswith("tunelab-train: error:")]
    assert len(errors) == 1 and line in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "outputs" / "mlflow.db").exists()  # refused before any run exists


def test_the_settings_are_checked_when_python_builds_them():
    with pytest.raises(TunelabError, match=r"^tune.max_lr must be > 0, got -1.$"):
        LRFinder(max_lr=-1)


def test_a_sweep_too_short_to_show_a_fall_is_one_line_and_keeps_its_plot(tmp_path):
    # 3 steps: after skipping the first (the average settling) and the last (the divergence) one is left
    result = run_train(tmp_path, "debug=smoke", *TINY, "tune=lr_find", "tune.steps=3")
    assert result.returncode == 2, result.stderr[-3000:]
    (error,) = [x for x in result.stderr.splitlines() if x.startswith("tunelab-train: error:")]
    assert "the range test found no LR where the loss falls (3 steps from 1e-07; reached tune.max_lr=1)" in error
    client = MlflowClient(store_uri(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("tunelab-lr_find").experiment_id])
    assert run.info.status == "FAILED" and run.info.run_id in error  # the plot to look at is named
    assert "lr_find.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
