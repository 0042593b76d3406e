"""Plateau-driven stage starts (strategy.plateau): the stage starts at the epoch the metric's
history dictates, at the latest at its bound; a resume lands in the same stage at the same step;
restore_best restores the best epoch's weights; the stage table says so; bad settings are one line."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from mlflow.tracking import MlflowClient

from plateau_probe import ScriptedMetric
from tunelab.config import build
from tunelab.engine.build import build_parts
from tunelab.engine.plan import validate
from tunelab.engine.plateau import PlateauWatch
from tunelab.engine.recipe import core_callbacks
from tunelab.engine.strategies import freeze_unfreeze, milestones, stage_at
from tunelab.errors import TunelabError

GROUPS = ["stem", "blocks.0", "blocks.1", "head"]
TINY = ["model.arch=test_efficientnet", "model.pretrained=false", "data.image_size=32",
        "trainer.limit_val_batches=1", "callbacks=none", "retention.enabled=false"]
# the head stage watches a scripted metric; the unfreeze starts on its plateau, at the latest at epoch 5
PLATEAU_RUN = [*TINY, "strategy=freeze_unfreeze_plateau", "strategy.head_epochs=5", "trainer.max_epochs=6",
               "strategy.plateau.monitor=probe/score", "strategy.plateau.patience=2",
               "strategy.plateau.restore_best=true"]
# best at epoch 1, then two epochs without improvement: the plateau is found at the end of epoch 3
HISTORY = [1.0, 0.9, 0.95, 0.93, 0.8, 0.7]


def stages_in_force(stages, history) -> list[int]:
    """The stage of each epoch, the checks made as the StageCallback makes them (one per epoch)."""
    watch, found = PlateauWatch(), []
    for epoch, value in enumerate(history):
        index = stage_at(watch.in_force(stages), epoch, 0)
        watch.enter(index, stages, epoch, 0)
        found.append(index)
        if watch.pending(stages) is not None:
            watch.observe(value, epoch, 0, stages, dict)
    return found


@pytest.mark.parametrize("settings, history, expected", [
    # min, patience 2: best 0.9 at epoch 1; epochs 2 and 3 do not beat it -> the unfreeze starts at epoch 4
    ({}, HISTORY, [0, 0, 0, 0, 1, 1]),
    # always improving: no plateau, the bound (epoch 5) starts it
    ({}, [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [0, 0, 0, 0, 0, 1, 1]),
    # min_delta 0.05: 0.97 and 0.96 improve on 1.0 by less -> plateau after epoch 2
    ({"min_delta": 0.05}, [1.0, 0.97, 0.96, 0.5, 0.4, 0.3], [0, 0, 0, 1, 1, 1]),
    # max: 0.6 equals the best (no improvement), 0.55 is worse -> plateau after epoch 3
    ({"mode": "max"}, [0.5, 0.6, 0.6, 0.55, 0.9, 0.9], [0, 0, 0, 0, 1, 1]),
    # a NaN never improves: patience 1 ends the stage right after it
    ({"patience": 1}, [1.0, math.nan, 0.5, 0.4, 0.3, 0.2], [0, 0, 1, 1, 1, 1]),
])
def test_the_stage_starts_at_the_epoch_the_history_dictates(settings, history, expected):
    stages = freeze_unfreeze(GROUPS, head_epochs=5, plateau={"monitor": "val/loss", "patience": 2, **settings})
    assert stages[1].plateau is not None and stages[0].plateau is None
    assert stages_in_force(stages, history) == expected


def test_each_stage_watches_its_own_plateau_from_its_start():
    """Three stages, patience 1: the watch starts afresh when a stage starts, so stage 1's first
    value (2.0, worse than stage 0's best 0.9) is its best, not a bad check."""
    stages = milestones(GROUPS, [{"at_epoch": 4, "unfreeze": 1}, {"at_epoch": 8, "unfreeze": "all"}],
                        plateau={"monitor": "val/loss", "patience": 1})
    history = [1.0, 0.9, 0.95, 2.0, 1.5, 1.6, 1.0, 0.9, 0.8]
    assert stages_in_force(stages, history) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_stage_table_says_when_a_plateau_stage_starts(cfg_factory):
    parts = build_parts(cfg_factory(*TINY, "strategy=freeze_unfreeze_plateau", "strategy.head_epochs=6",
                                    "trainer.max_epochs=7", "strategy.plateau.patience=2"))
    table = parts.stage_table()
    assert table.splitlines()[0].split()[2:] == ["head@ep0", "unfreeze@<=ep6"]
    assert "unfreeze starts on plateau of val/loss (min, patience 2), at the latest epoch 6" in table
    # debug=smoke (2 epochs) squeezes the bound to one step after the head stage's start
    smoke = build_parts(cfg_factory(*TINY, "strategy=freeze_unfreeze_plateau")).stage_table()
    assert "unfreeze@<=step1" in smoke and "at the latest step 1" in smoke and "debug=smoke compressed" in smoke


def _fit(cfg_factory, tmp_path, history, *overrides, ckpt_path=None, keep_at=()):
    """A real Trainer run with the core callbacks, the scripted metric and last.ckpt every epoch;
    ``keep_at`` copies the last.ckpt present when those epochs start (that of the epoch before)."""
    torch.manual_seed(123)
    cfg = cfg_factory(*PLATEAU_RUN, *overrides)
    parts = build_parts(cfg)
    probe = ScriptedMetric(history)
    folder = tmp_path / "ckpt"
    last = ModelCheckpoint(dirpath=folder, filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
    trainer = build(cfg.trainer, "trainer", logger=False, enable_checkpointing=True,
                    callbacks=[*core_callbacks(), probe, last, _KeepCheckpoint(folder / "last.ckpt", keep_at)])
    trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=ckpt_path, weights_only=True)
    return parts.module, probe


class _KeepCheckpoint(L.Callback):
    def __init__(self, last, epochs):
        self.last, self.epochs = last, epochs

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch in self.epochs:
            shutil.copy(self.last, self.last.with_name(f"before{trainer.current_epoch}.ckpt"))


def _start_step(module, name: str) -> int:
    return next(step for step, stage in module.stage_log if stage == name)


@pytest.mark.slow
def test_real_run_plateau_start_restore_best_and_resume(cfg_factory, tmp_path):
    module, probe = _fit(cfg_factory, tmp_path, HISTORY, keep_at=(3, 4))
    # (a) the scripted history plateaus after epoch 3 (bound: epoch 5): epoch 4 unfreezes, at step 4 x 2
    assert probe.stages == {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 1}
    assert _start_step(module, "unfreeze") == 8
    # (c) restore_best: epoch 4 trains from the weights of epoch 1 (the best), not those of epoch 3
    start, best, last = probe.start_weights[4], probe.end_weights[1], probe.end_weights[3]
    assert all(torch.equal(start[k], best[k]) for k in start)
    assert any(not torch.equal(start[k], last[k]) for k in start)
    reference = {k: v.clone() for k, v in module.model.state_dict().items()}

    # (b) resume from last.ckpt of epoch 2 (plateau half-counted, best weights held) and of epoch 3
    # (decided, not started): the same stages, the same start step, the same final weights
    for before in (3, 4):
        ckpt = tmp_path / "ckpt" / f"before{before}.ckpt"
        state = torch.load(ckpt, weights_only=True)["callbacks"]["StageCallback"]
        assert (state["bad"], state["starts"]) == ((1, {}) if before == 3 else (2, {1: 4}))
        resumed, again = _fit(cfg_factory, tmp_path / f"resume{before}", HISTORY, ckpt_path=str(ckpt))
        assert again.stages == {e: s for e, s in probe.stages.items() if e >= before}
        assert _start_step(resumed, "unfreeze") == 8 and resumed.stage_start_step == 8
        assert all(torch.equal(again.start_weights[4][k], best[k]) for k in best)
        final = resumed.model.state_dict()
        assert all(torch.allclose(reference[k].float(), final[k].float(), atol=1e-6) for k in reference)


@pytest.mark.slow
def test_a_monitor_nothing_logs_is_one_line(cfg_factory, tmp_path):
    with pytest.raises(TunelabError) as err:
        _fit(cfg_factory, tmp_path, HISTORY, "strategy.plateau.monitor=val/lss")
    message = str(err.value)
    assert "\n" not in message and message.startswith("strategy.plateau.monitor='val/lss' is not a logged metric")
    assert "'val/loss'" in message  # the logged metrics are listed


@pytest.mark.parametrize("override, expected", [
    ("strategy.plateau.patience=0", "strategy.plateau.patience must be an integer >= 1, got 0."),
    ("strategy.plateau.mode=lowest", "strategy.plateau.mode must be min or max, got 'lowest'."),
    ("+strategy.plateau.patiance=3", "strategy.plateau.patiance is not a plateau setting"),
    ("strategy.plateau=5", "strategy.plateau must be a mapping of settings, got 5."),
])
def test_bad_plateau_settings_fail_before_any_run(cfg_factory, override, expected):
    cfg = cfg_factory("strategy=freeze_unfreeze_plateau", override)
    with pytest.raises(TunelabError) as err:
        validate(cfg)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_plateau_is_refused_by_a_strategy_without_stages(cfg_factory):
    with pytest.raises(TunelabError, match="strategy.plateau is not a setting of tunelab.engine.strategies.full"):
        validate(cfg_factory("strategy=full", "+strategy.plateau.monitor=val/loss"))


@pytest.mark.slow
def test_smoke_run_with_a_plateau_stage_finishes_and_logs_its_table(tmp_path, monkeypatch):
    """debug=smoke through tunelab's own train(): the compressed plateau stage still starts (at its
    bound, step 1) and the MLflow run holds the stage table that says so."""
    from conftest import compose_cfg
    from tunelab.cli.train import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_cfg(tmp_path, [*TINY, "strategy=freeze_unfreeze_plateau", "data.ood={}"])
    train(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "stage") if m.value == 1.0][0] == 1
    table = Path(client.download_artifacts(run.info.run_id, "stage_table.txt", str(tmp_path))).read_text()
    assert "unfreeze starts on plateau of val/loss (min, patience 1), at the latest step 1" in table


@pytest.mark.slow
def test_ddp_ranks_start_the_plateau_stage_together(tmp_path):
    """Two gloo ranks whose own values disagree (rank 0 plateaus after epoch 1, rank 1 keeps
    improving): both start the unfreeze where rank 0's values put it, epoch 2, at the same step."""
    import json

    from conftest import probe_env, run_cli

    overrides = ["trainer=ddp_cpu", "debug=smoke", *[o for o in TINY if o != "callbacks=none"], "data.ood={}",
                 "strategy=freeze_unfreeze_plateau", "strategy.head_epochs=3", "trainer.max_epochs=4",
                 "strategy.plateau.monitor=probe/score", "strategy.plateau.patience=1",
                 "+callbacks.probe._target_=plateau_probe.ScriptedMetric", "+callbacks.probe.history=[1.0,1.1,1.2,1.3]",
                 "+callbacks.probe.rank_history=[1.0,0.9,0.8,0.7]", f"+callbacks.probe.report={tmp_path}/stages"]
    result = run_cli(tmp_path, *overrides, env=probe_env("plateau_probe"))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / "stages" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["stages"] == ranks[1]["stages"] == {"0": 0, "1": 0, "2": 1, "3": 1}
    assert ranks[0]["stage_log"] == ranks[1]["stage_log"] and [4, "unfreeze"] in ranks[0]["stage_log"]  # 2 steps an epoch


def test_no_feature_cache_before_a_plateau_stage(cfg_factory):
    """The cached head-only epochs end when the unfreeze starts, which a plateau decides during the
    run: the cache (planned before it) is off, where the same fixed schedule caches epochs 0-1."""
    cache = ["data.augment=null", "trainer.limit_train_batches=1.0", "module.batchnorm=eval",
             "perf.cache_features=true", "strategy.head_epochs=2", "trainer.max_epochs=3"]
    fixed = build_parts(cfg_factory(*TINY, *cache, "strategy=freeze_unfreeze"))
    assert fixed.cache_plan.epochs == range(0, 2)
    with pytest.raises(TunelabError, match="perf.cache_features=true but the cache would change training"):
        build_parts(cfg_factory(*TINY, *cache, "strategy=freeze_unfreeze_plateau"))
