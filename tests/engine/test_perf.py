"""Speed options change nothing but speed: cached features, torch.compile with recompilation at
stage changes, channels_last and fused optimizers give the same training as the plain path."""

from __future__ import annotations

import pytest
import torch

from tunelab.engine.recipe import core_callbacks
from tunelab.config import build
from tunelab.engine.build import build_parts
from tunelab.errors import TunelabError

TINY = ["model.arch=test_efficientnet", "model.pretrained=false", "data.image_size=32", "data.augment=null",
        "data.max_train_samples=96", "data.batch_size=16", "data.eval_batch_size=32", "trainer.limit_train_batches=1.0",
        "trainer.limit_val_batches=1.0", "trainer.max_epochs=3", "callbacks=none", "retention.enabled=false",
        "module.batchnorm=eval"]  # a random init defaults to batch statistics, which no cache can reproduce


def fit(cfg_factory, *overrides, inputs: list | None = None):
    """The parts and the per-step losses of a real fit; ``inputs`` collects each step's input type."""
    torch.manual_seed(0)
    cfg = cfg_factory(*TINY, *overrides)
    parts = build_parts(cfg)
    losses = []

    import lightning as L

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))
            if inputs is not None:
                inputs.append(type(batch[0]).__name__)

    trainer = build(cfg.trainer, "trainer", logger=False, enable_checkpointing=False,
                    callbacks=[*core_callbacks(parts), Record()])
    trainer.fit(parts.module, datamodule=parts.datamodule, weights_only=True)
    return parts, losses


def head_weights(parts) -> dict[str, torch.Tensor]:
    names = set(parts.adapter.groups[-1].param_names)
    return {n: p.detach().clone() for n, p in parts.module.model.named_parameters() if n in names}


def assert_same(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        diff = (a[name] - b[name]).abs().max().item()
        assert diff <= atol, f"{name} differs by {diff:.2e}"


@pytest.mark.parametrize("strategy", ["linear_probe", "freeze_unfreeze"])
def test_cached_features_train_the_same_head_as_the_backbone(cfg_factory, strategy):
    """Same seed, same batches: the head trained on cached features equals the head trained
    through the backbone, with head dropout on (model.drop_rate=0.3 draws the same masks)."""
    extra = [f"strategy={strategy}", "model.drop_rate=0.3"] + (["strategy.head_epochs=2"] if strategy != "linear_probe" else [])
    inputs: list[str] = []
    cached, cached_losses = fit(cfg_factory, *extra, "perf.cache_features=true", inputs=inputs)
    plain, plain_losses = fit(cfg_factory, *extra, "perf.cache_features=false")
    assert cached.cache_plan.epochs == range(0, 3 if strategy == "linear_probe" else 2)
    assert plain.cache_plan.epochs is None and "perf.cache_features=false" in plain.stage_table()
    assert "feature cache: on for epochs 0-" in cached.stage_table()
    assert len(cached_losses) == len(plain_losses) == 3 * 6
    assert cached_losses == pytest.approx(plain_losses, abs=1e-5)
    assert_same(head_weights(cached), head_weights(plain), atol=1e-5)
    if strategy == "freeze_unfreeze":  # epoch 2 went back to images and trained the backbone too
        backbone = {n: p for n, p in cached.module.model.named_parameters() if n not in head_weights(cached)}
        plain_backbone = {n: p for n, p in plain.module.model.named_parameters() if n in backbone}
        assert_same({n: p.detach() for n, p in backbone.items()}, {n: p.detach() for n, p in plain_backbone.items()}, 1e-5)
    # the cached epochs really read BackboneFeatures (the head alone); the last one went back to images
    cached_epochs = 3 if strategy == "linear_probe" else 2
    assert inputs == ["BackboneFeatures"] * 6 * cached_epochs + ["Tensor"] * 6 * (3 - cached_epochs)
    assert cached.datamodule.feature_cache is None  # served for the fit only


@pytest.mark.parametrize("override, reason", [
    ("data.augment.scale=[0.8,1.0]", "random augmentation"),
    ("model.drop_path_rate=0.1", "drop-path"),
    ("module.batchnorm=train", "BatchNorm"),
    ("strategy=full", "no epoch-based stage trains the head alone"),
])
def test_cache_is_refused_where_it_would_change_training(cfg_factory, override, reason):
    overrides = [o for o in TINY if not o.startswith("data.augment")] if override.startswith("data.augment") else TINY
    if override.startswith("data.augment"):
        overrides = [*overrides, "data.augment={scale: [0.8, 1.0]}"]
        override = "strategy=linear_probe"
    with pytest.raises(TunelabError, match=reason):
        build_parts(cfg_factory(*overrides, "strategy=linear_probe", override, "perf.cache_features=true"))
    auto = build_parts(cfg_factory(*overrides, "strategy=linear_probe", override))
    assert auto.cache_plan.epochs is None and reason in auto.cache_plan.reason


def test_auto_caches_only_when_it_pays(cfg_factory):
    assert build_parts(cfg_factory(*TINY, "strategy=linear_probe")).cache_plan.epochs == range(0, 3)
    short = build_parts(cfg_factory(*TINY, "strategy=freeze_unfreeze"))  # one head epoch
    assert short.cache_plan.epochs is None and "shorter than two full epochs" in short.cache_plan.reason
    smoke = build_parts(cfg_factory(*TINY, "strategy=linear_probe", "trainer.limit_train_batches=2"))
    assert smoke.cache_plan.epochs is None


def test_text_model_caches_its_pooled_features(cfg_factory, tiny_bert):
    """The text adapter's split: classify(features(x)) is the model's output, and the cache
    refuses a backbone whose dropout is active (BERT's hidden dropout)."""
    common = ["model=hf_text", f"model.path={tiny_bert}", "data=drug_reviews", "data.max_length=16",
              "strategy=linear_probe", "trainer.max_epochs=3"]
    with pytest.raises(TunelabError, match="dropout"):
        build_parts(cfg_factory(*common, "perf.cache_features=true"))
    parts = build_parts(cfg_factory(*common, "perf.cache_features=true",
                                    "+model.config_overrides.hidden_dropout_prob=0.0",
                                    "+model.config_overrides.attention_probs_dropout_prob=0.0"))
    assert parts.cache_plan.epochs == range(0, 3)
    x = parts.datamodule.first_inputs("val", 3)
    model = parts.adapter.model.eval()
    with torch.no_grad():
        assert torch.allclose(parts.adapter.classify(model, parts.adapter.features(model, x)), model(x), atol=1e-6)


@pytest.mark.slow  # two real fits, one through torch.compile
def test_compiled_run_recompiles_at_the_stage_change_and_matches_eager(cfg_factory):
    """aot_eager runs dynamo + AOTAutograd (where the frozen backward is dropped) without
    waiting for C++ code generation; the losses must equal eager ones step by step."""
    common = ["strategy=freeze_unfreeze", "strategy.head_epochs=1", "trainer.max_epochs=2", "perf.cache_features=false",
              "model.drop_rate=0.0", "data.max_train_samples=48"]
    compiled, compiled_losses = fit(cfg_factory, *common, "perf.compile=true", "perf.compile_backend=aot_eager")
    eager, eager_losses = fit(cfg_factory, *common)
    assert compiled.module.compiles == 2  # once for the head stage, again when the backbone opened
    assert eager.module.compiles == 0
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-4)
    assert_same(dict(compiled.module.model.named_parameters()), dict(eager.module.model.named_parameters()), 1e-4)
    saved = compiled.module.state_dict()
    assert not any("_orig_mod" in k for k in saved), "checkpoints must hold the plain model"


def test_frozen_layers_get_no_gradient_after_recompiling(cfg_factory):
    """Compiled while everything trained, then frozen to the head: the recompiled graph gives the
    backbone no gradient at all (a graph traced before the freeze would keep computing it)."""
    parts = build_parts(cfg_factory(*TINY, "strategy=freeze_unfreeze", "perf.compile=true",
                                    "perf.compile_backend=aot_eager", "perf.cache_features=false"))
    module, head = parts.module, set(parts.adapter.groups[-1].param_names)
    x = torch.randn(4, 3, 32, 32)
    module.set_stage(1, start_step=0)  # everything trains
    module(x).sum().backward()
    assert all(p.grad is not None for p in module.model.parameters())
    module.zero_grad(set_to_none=True)
    module.set_stage(0, start_step=0)  # head only
    module(x).sum().backward()
    assert module.compiles == 2  # once for everything trainable, again for the head alone
    for name, p in module.model.named_parameters():
        assert (p.grad is not None) == (name in head), name


def test_channels_last_changes_nothing_but_layout(cfg_factory):
    plain_parts, plain = fit(cfg_factory, "strategy=full", "perf.cache_features=false", "trainer.max_epochs=1",
                             "perf.channels_last=false")
    parts, nhwc = fit(cfg_factory, "strategy=full", "perf.cache_features=false", "trainer.max_epochs=1",
                      "perf.channels_last=true")
    plain_conv = next(m for m in plain_parts.module.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert not plain_conv.weight.is_contiguous(memory_format=torch.channels_last)
    conv = next(m for m in parts.module.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc == pytest.approx(plain, abs=1e-4)


def test_fused_adamw_matches_the_default_implementation(cfg_factory):
    _, default = fit(cfg_factory, "strategy=full", "perf.cache_features=false", "trainer.max_epochs=1")
    parts, fused = fit(cfg_factory, "strategy=full", "perf.cache_features=false", "trainer.max_epochs=1",
                       "perf.fused_optimizer=true")
    assert parts.module.trainer.optimizers[0].defaults["fused"] is True
    assert fused == pytest.approx(default, abs=1e-4)


@pytest.mark.parametrize("override, message", [
    ("perf.compile_mode=fastest", "perf.compile_mode must be one of"),
    ("perf.compile_backend=nope", "not a torch.compile backend"),
    ("perf.cache_features=sometimes", "perf.cache_features must be auto, true or false"),
])
def test_bad_perf_settings_are_rejected_before_training(cfg_factory, override, message):
    with pytest.raises(TunelabError, match=message):
        build_parts(cfg_factory(*TINY, "perf.compile=true", override))


def test_a_head_split_that_does_not_reproduce_the_model_is_refused(cfg_factory):
    """The cache checks classify(features(x)) == model(x) before use: a wrong split would
    silently train a different head."""
    from tunelab.engine.feature_cache import FeatureCache

    parts = build_parts(cfg_factory(*TINY, "strategy=linear_probe", "perf.cache_features=true"))
    cache = FeatureCache(parts.cache_plan, parts.adapter)
    cache.module = parts.module
    parts.adapter.classify = lambda model, f: model.get_classifier()(f) + 1.0
    with pytest.raises(TunelabError, match="head split does not reproduce its output"):
        cache._check(parts.module.model.eval(), parts.datamodule)


def test_fused_optimizer_true_needs_an_optimizer_with_a_fused_kernel():
    import functools

    from tunelab.engine.perf import fused_kwargs

    with pytest.raises(TunelabError, match="has no fused kernel"):
        fused_kwargs(functools.partial(torch.optim.LBFGS, lr=0.1), True, torch.device("cpu"))
    assert fused_kwargs(functools.partial(torch.optim.AdamW, lr=0.1), "auto", torch.device("cpu")) == {"fused": True}
    assert fused_kwargs(functools.partial(torch.optim.AdamW, lr=0.1), False, torch.device("cpu")) == {}
