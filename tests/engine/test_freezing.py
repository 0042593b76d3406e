"""Frozen means frozen: no update, no decay drift, no optimizer state, no BatchNorm drift."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from tunelab.config import build
from tunelab.engine.build import build_parts
from tunelab.engine.stage_callback import StageCallback


class _Snapshots(L.Callback):
    """Copies of the model's state and the optimizer's state keys at each epoch end."""

    def __init__(self):
        self.states, self.opt_state_params = {}, {}

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = trainer.current_epoch
        self.states[epoch] = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        self.opt_state_params[epoch] = {id(p) for p in trainer.optimizers[0].state}


def _fit(cfg_factory, *overrides):
    cfg = cfg_factory("strategy=freeze_unfreeze", "strategy.head_epochs=1", "trainer.max_epochs=2",
                      "trainer.limit_val_batches=0", "callbacks=none", *overrides)
    parts = build_parts(cfg)
    initial = {k: v.detach().clone() for k, v in parts.module.model.state_dict().items()}
    snaps = _Snapshots()
    trainer = build(cfg.trainer, "trainer", logger=False, enable_checkpointing=False,
                    callbacks=[StageCallback(), snaps])
    trainer.fit(parts.module, datamodule=parts.datamodule)
    return parts, initial, snaps


@pytest.mark.slow
@pytest.mark.parametrize("batchnorm", ["eval", "frozen_eval", "train"])
def test_backbone_bit_identical_while_frozen_then_changes(cfg_factory, batchnorm):
    parts, initial, snaps = _fit(cfg_factory, f"module.batchnorm={batchnorm}")
    model = parts.module.model
    head = set(parts.adapter.groups[-1].param_names)
    params = dict(model.named_parameters())
    assert model.get_classifier().out_features == parts.datamodule.num_classes == 10

    after_head = snaps.states[0]
    # In "train" mode BatchNorm statistics drift even while frozen (that is what the mode means).
    drift_ok = ("running_mean", "running_var", "num_batches_tracked") if batchnorm == "train" else ()
    frozen_keys = [k for k in initial if k not in head and not k.endswith(drift_ok or ("\0",))]
    assert frozen_keys and all(torch.equal(after_head[k], initial[k]) for k in frozen_keys), (
        "backbone parameters and BatchNorm statistics must be bit-identical during the head stage"
    )
    assert all(not torch.equal(after_head[k], initial[k]) for k in head), "the head must train"
    # AdamW created state only for what trained: no moments for frozen parameters.
    assert snaps.opt_state_params[0] == {id(params[n]) for n in head}

    after_all = snaps.states[1]
    backbone = [n for n in params if n not in head]
    unchanged = [n for n in backbone if torch.equal(after_all[n], initial[n])]
    assert not unchanged, f"after unfreezing every backbone parameter trains; unchanged: {unchanged[:5]}"
    assert len(snaps.opt_state_params[1]) == len(params)


@pytest.mark.slow
def test_batchnorm_eval_mode_keeps_running_statistics(cfg_factory):
    parts, initial, snaps = _fit(cfg_factory, "module.batchnorm=eval")
    stats = [k for k in initial if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(snaps.states[1][k], initial[k]) for k in stats)
    # ...while frozen_eval lets unfrozen layers adapt their statistics to the new data.
    parts, initial, snaps = _fit(cfg_factory, "module.batchnorm=frozen_eval")
    assert any(not torch.equal(snaps.states[1][k], initial[k]) for k in stats)


@pytest.mark.slow
def test_unfreeze_applies_new_lrs_immediately(cfg_factory):
    parts, _, _ = _fit(cfg_factory, "strategy.lr_mult=0.25", "scheduler=constant")
    lrs = parts.module.group_lrs()
    base = 1e-3
    assert lrs["head"] == pytest.approx(base) and lrs["blocks.3"] == pytest.approx(0.25 * base)


@pytest.mark.slow
def test_resume_lands_in_the_stage_of_its_epoch(cfg_factory, tmp_path):
    """Stop after the head stage, resume from last.ckpt: the unfreeze stage runs with its LRs."""
    from tunelab.cli.train import train

    # The first job is a head-only run of one epoch (a freeze_unfreeze schedule whose second
    # stage lies beyond max_epochs is rejected); its checkpoint is the "interrupted" state.
    first = cfg_factory("trainer.max_epochs=1", "strategy=linear_probe", "scheduler=constant")
    train(first)
    (last,) = (tmp_path / "run" / "checkpoints").glob("last.ckpt")
    resumed = cfg_factory(f"ckpt_path={last}", "strategy.lr_mult=0.5", "scheduler=constant")
    parts = build_parts(resumed)
    trainer = build(resumed.trainer, "trainer", logger=False, enable_checkpointing=False, callbacks=[StageCallback()])
    trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=str(last), weights_only=True)
    assert parts.module.stage_index == 1
    assert parts.module.group_lrs()["blocks.0"] == pytest.approx(0.5e-3)
    assert trainer.global_step == 4  # 2 steps before the stop + 2 after the resume
    assert torch.load(last, weights_only=True)["tunelab"]["stage_index"] == 0


@pytest.mark.parametrize("overrides, mode", [
    ([], "eval"),                                                  # pretrained: keep ImageNet statistics
    (["model.pretrained=false"], "train"),                         # random init: nothing worth keeping
    (["model.pretrained=false", "model.checkpoint=/w.pth"], "eval"),  # weights from a file are pretrained
    (["model.pretrained=false", "module.batchnorm=frozen_eval"], "frozen_eval"),  # an explicit choice wins
])
def test_batchnorm_auto_follows_whether_the_weights_are_pretrained(cfg_factory, overrides, mode):
    from tunelab.engine.build import batchnorm_mode

    assert batchnorm_mode(cfg_factory(*overrides)) == mode
