"""EMA of the weights (ema=default, engine/ema.py) on a tiny model: the average follows timm's
decay formula step by step, validation / checkpoints / testing use it, a resume restores it
exactly, and a trained model read back (tunelab-export, init_from) is the EMA model."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import compose_cfg
from helpers.interrupt import Interrupt, StopAt
from tunelab.config import build
from tunelab.config.settings import accepted
from tunelab.engine.build import build_parts
from tunelab.engine.ema import WeightEMA
from tunelab.engine.recipe import core_callbacks
from tunelab.engine.validation import check_config
from tunelab.errors import TunelabError

TINY = ["model.arch=test_efficientnet", "model.pretrained=false", "data.image_size=32", "retention.enabled=false",
        "data.ood={}", "trainer.limit_val_batches=1", "ema=default"]


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _Record(L.Callback):
    """The raw weights and the EMA after every optimizer step (placed after the EMA callback)."""

    def __init__(self, ema: WeightEMA):
        self.ema, self.raw, self.avg, self.epoch_of = ema, {}, {}, {}

    def on_train_start(self, trainer, module):
        self.raw[0] = _state(module.model)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step not in self.raw:
            self.raw[step], self.avg[step] = _state(module.model), _state(self.ema.ema.module)
            self.epoch_of[step] = trainer.current_epoch


def _fit(cfg, ema: WeightEMA, *extra, ckpt_path=None, checkpoints=False):
    torch.manual_seed(123)
    parts = build_parts(cfg)
    made = [build(node, f"callbacks.{name}") for name, node in cfg.callbacks.items() if name != "ema"]
    trainer = build(cfg.trainer, "trainer", logger=False, enable_checkpointing=checkpoints,
                    callbacks=[*core_callbacks(parts), ema, *extra, *made])
    trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=ckpt_path, weights_only=True)
    return trainer, parts


def _decay(step: int, decay: float, warmup: bool, after: int, power: float = 0.75, gamma: float = 1.0) -> float:
    """timm ModelEmaV3.get_decay, written out: 0 (a copy) up to step after + 1, then the warmup."""
    s = step - after - 1
    if s <= 0:
        return 0.0
    return min(decay, 1 - (1 + s / gamma) ** -power) if warmup else decay


@pytest.mark.slow
@pytest.mark.parametrize("accumulate,after", [(1, 0), (2, 1)])
def test_ema_follows_the_decay_formula_and_frozen_weights_average_to_themselves(cfg_factory, accumulate, after):
    """ema_t = d_t·ema_{t−1} + (1 − d_t)·w_t over the recorded weights, one update per optimizer
    step (gradient accumulation included); a group frozen in the first stage has an EMA equal to
    its weights bit for bit when it starts training (nothing to reset at the stage change)."""
    cfg = cfg_factory(*TINY, "callbacks=none", "trainer.limit_train_batches=4", f"+trainer.accumulate_grad_batches={accumulate}")
    ema = WeightEMA(decay=0.5, warmup=True, update_after_step=after)
    record = _Record(ema)
    _fit(cfg, ema, record)
    steps = sorted(record.avg)
    assert steps == list(range(1, 8 // accumulate + 1))
    expected = {k: v.double() for k, v in record.raw[0].items()}
    for t in steps:
        d = _decay(t, 0.5, True, after)
        for k, w in record.raw[t].items():
            expected[k] = d * expected[k] + (1 - d) * w.double() if w.is_floating_point() else w
        worst = max((record.avg[t][k].double() - v).abs().max().item() for k, v in expected.items())
        assert worst < 1e-6, f"step {t} (decay {d:.3f}): EMA off the formula by {worst:.2e}"
    # the EMA is not the weights (else the formula check above would prove nothing)
    assert any(not torch.allclose(record.avg[steps[-1]][k], record.raw[steps[-1]][k]) for k in expected)
    first_epoch = [t for t in steps if record.epoch_of[t] == 0]
    frozen = [k for k, v in record.raw[0].items() if all(torch.equal(record.raw[t][k], v) for t in first_epoch)
              and not torch.equal(record.raw[steps[-1]][k], v)]
    assert frozen, "the first stage froze nothing that trained later"
    assert all(torch.equal(record.avg[first_epoch[-1]][k], record.raw[0][k]) for k in frozen)


def _validate(cfg, parts, weights) -> float:
    parts.module.model.load_state_dict(weights)
    trainer = build(cfg.trainer, "trainer", logger=False, enable_checkpointing=False, callbacks=[])
    return trainer.validate(parts.module, datamodule=parts.datamodule, verbose=False)[0]["val/loss"]


@pytest.mark.slow
def test_validation_checkpoints_and_testing_use_the_ema(cfg_factory):
    """decay 1 without warmup keeps the EMA at the weights after step 1: the logged val/loss is
    theirs (not the trained weights'), the best checkpoint holds the raw weights of its epoch and
    that EMA, and testing the best checkpoint leaves the EMA weights in the model."""
    cfg = cfg_factory(*TINY)  # smoke: 2 epochs of 2 steps; callbacks=default: best + last checkpoints
    ema = WeightEMA(decay=1.0, warmup=False)
    record = _Record(ema)
    trainer, parts = _fit(cfg, ema, record, checkpoints=True)
    logged = float(trainer.callback_metrics["val/loss"])
    final = _state(parts.module.model)
    best = trainer.checkpoint_callback.best_model_path
    assert best.endswith("epoch00.ckpt")  # the EMA never moved: no later epoch beats the first
    saved = torch.load(best, weights_only=True)
    step1 = {k: v for k, v in record.raw[1].items() if v.is_floating_point()}  # counters are copied, not averaged
    for k, v in step1.items():
        assert torch.equal(saved["ema_state_dict"][f"model.{k}"], v)
        assert torch.equal(saved["state_dict"][f"model.{k}"], record.raw[2][k])  # raw weights, end of epoch 0

    trainer.test(parts.module, datamodule=parts.datamodule, ckpt_path=best, weights_only=True, verbose=False)
    assert all(torch.equal(parts.module.model.state_dict()[k], v) for k, v in step1.items())
    assert logged == pytest.approx(_validate(cfg, parts, record.raw[1]), abs=1e-6)
    assert abs(logged - _validate(cfg, parts, final)) > 1e-4  # the raw weights score otherwise


@pytest.mark.slow
def test_resume_restores_the_ema_exactly(cfg_factory, tmp_path):
    """Stopped mid-epoch after the stage change and resumed: the same EMA (and weights) as never
    stopping; the same resume from a checkpoint stripped of its EMA ends elsewhere."""
    cfg = cfg_factory(*TINY, "callbacks=none", "trainer.limit_train_batches=3")

    def run(*extra, ckpt_path=None):
        ema = WeightEMA(decay=0.999, warmup=True)
        try:
            trainer, parts = _fit(cfg, ema, *extra, ckpt_path=ckpt_path)
        except Interrupt:
            return None, None
        return _state(ema.ema.module), _state(parts.module.model)

    reference, reference_raw = run()
    ckpt = tmp_path / "stopped.ckpt"
    run(StopAt(4, ckpt))  # epoch 1, its first step of 3
    saved = torch.load(ckpt, weights_only=True)
    assert any(not torch.equal(saved["ema_state_dict"][k], v) for k, v in saved["state_dict"].items()
               if k.startswith("model."))
    resumed, resumed_raw = run(ckpt_path=str(ckpt))
    assert all(torch.allclose(reference[k].float(), resumed[k].float(), atol=1e-6) for k in reference)
    assert all(torch.allclose(reference_raw[k].float(), resumed_raw[k].float(), atol=1e-6) for k in reference)

    del saved["ema_state_dict"]  # negative control: a resume that restarts the average
    torch.save(saved, tmp_path / "no_ema.ckpt")
    restarted, _ = run(ckpt_path=str(tmp_path / "no_ema.ckpt"))
    assert any(not torch.allclose(reference[k].float(), restarted[k].float(), atol=1e-6) for k in reference)


def test_ema_settings_are_checked_before_any_run(cfg_factory):
    with pytest.raises(TunelabError, match=r"callbacks\.ema\.decay must be in \[0, 1\], got 1\.5"):
        check_config(cfg_factory(*TINY, "callbacks.ema.decay=1.5"))
    with pytest.raises(TunelabError, match=r"callbacks\.ema\.decai is not a setting"):
        check_config(cfg_factory(*TINY, "+callbacks.ema.decai=0.9"))


# -- a trained model read back is the EMA model ------------------------------------------------------
@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A real tunelab-train run whose EMA stays at the weights after step 1 (decay 1), while a
    high learning rate takes the raw weights far from them."""
    import os

    from tunelab.cli.train import train

    tmp = tmp_path_factory.mktemp("ema_run")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    cfg = compose_cfg(tmp, [*TINY, "callbacks.ema.decay=1.0", "callbacks.ema.warmup=false", "optimizer.lr=0.01"])
    train(cfg)
    best = next((tmp / "run" / "checkpoints").glob("epoch*.ckpt"))
    return cfg, best, torch.load(best, weights_only=True)


def _models(cfg, saved):
    """The run's model with its EMA weights and with its raw weights, built by hand."""
    from tunelab.engine.trained import Predictor

    out = []
    for key in ("ema_state_dict", "state_dict"):
        adapter = build(cfg.model, "model", num_outputs=10, **accepted(cfg.model, {"image_size": 32}))
        adapter.model.load_state_dict({k[6:]: v for k, v in saved[key].items() if k.startswith("model.")})
        out.append(Predictor(adapter, "classification").eval())
    return out


@pytest.mark.slow
def test_export_writes_the_ema_model(ema_run, tmp_path):
    from tunelab.cli import export as export_cli
    from tunelab.deploy.exported import Exported

    cfg, best, saved = ema_run
    export_cli.main([str(best), "--out", str(tmp_path / "export"), "--format", "torchscript"])
    exported = Exported(tmp_path / "export", "torchscript")
    x = torch.randn(4, 3, 32, 32)
    ema_model, raw_model = _models(cfg, saved)
    with torch.no_grad():
        got, want, raw = exported.module(x), ema_model(x), raw_model(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert (got - raw).abs().max() > 5e-3  # the raw weights answer otherwise (0.023 measured)


@pytest.mark.slow
def test_init_from_reads_the_ema_weights(ema_run, tmp_path):
    from tunelab.engine.trained import init_from

    cfg, best, saved = ema_run
    adapter = build(cfg.model, "model", num_outputs=10, **accepted(cfg.model, {"image_size": 32}))
    init_from(adapter, str(best), f"sqlite:///{tmp_path / 'm.db'}")
    got = adapter.model.state_dict()
    ema = {k[6:]: v for k, v in saved["ema_state_dict"].items()}
    raw = {k[6:]: v for k, v in saved["state_dict"].items() if k.startswith("model.")}
    assert all(torch.equal(got[k], v) for k, v in ema.items())
    assert any(not torch.equal(got[k], v) for k, v in raw.items())


def test_plans_the_ema_cannot_follow_are_refused():
    """A weights-only ModelCheckpoint would drop the average; cached validation features after a
    stage that trained the backbone would not be the EMA model's features."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint

    from tunelab.engine.ema import _check_cache
    from tunelab.engine.feature_cache import CachePlan, FeatureCache

    with pytest.raises(TunelabError, match="save_weights_only"):
        WeightEMA().setup(SimpleNamespace(checkpoint_callbacks=[ModelCheckpoint(save_weights_only=True)]), None, "fit")
    WeightEMA().setup(SimpleNamespace(checkpoint_callbacks=[ModelCheckpoint()]), None, "fit")
    with pytest.raises(TunelabError, match="perf.cache_features=false"):
        _check_cache(SimpleNamespace(callbacks=[FeatureCache(CachePlan(range(1, 3), "head-only"), None)]))
    _check_cache(SimpleNamespace(callbacks=[FeatureCache(CachePlan(range(0, 2), "head-only"), None)]))


class _ValAt(L.Callback):
    """val/loss and the EMA when validation of ``epoch`` ends."""

    def __init__(self, ema: WeightEMA, epoch: int):
        self.ema, self.epoch, self.loss, self.avg = ema, epoch, None, None

    def on_validation_end(self, trainer, module):
        if trainer.current_epoch == self.epoch and not trainer.sanity_checking:
            self.loss, self.avg = float(trainer.callback_metrics["val/loss"]), _state(self.ema.ema.module)


@pytest.mark.slow
def test_cached_feature_validation_is_the_ema_models(cfg_factory):
    """Epochs 0-1 train the head on cached backbone features, validated on cached features too:
    the backbone's average is the backbone bit for bit, and epoch 1's val/loss is the EMA model's
    val/loss on the images (uncached)."""
    cfg = cfg_factory(*TINY, "callbacks=none", "perf.cache_features=true", "module.batchnorm=eval", "data.augment=null",
                      "strategy.head_epochs=2", "trainer.max_epochs=3", "compress_stages=false")
    ema = WeightEMA(decay=0.5, warmup=False)
    record, val = _Record(ema), _ValAt(ema, 1)
    trainer, parts = _fit(cfg, ema, record, val)
    assert parts.cache_plan.epochs == range(0, 2)
    head = set(parts.adapter.groups[-1].param_names)
    cached_steps = [t for t in record.avg if record.epoch_of[t] <= 1]
    assert all(torch.equal(record.avg[t][k], record.raw[0][k]) for t in cached_steps
               for k in record.raw[0] if k not in head)
    assert any(not torch.equal(val.avg[k], record.raw[cached_steps[-1]][k]) for k in head)  # EMA ≠ raw head
    assert val.loss == pytest.approx(_validate(cfg, parts, val.avg), abs=1e-5)
