"""perf.activation_checkpointing: the same gradients for less saved memory, for timm CNNs, timm
ViTs and transformers models; refused in one line where it cannot be exact or cannot run."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from helpers.runs import mlflow_runs, train_cli
from tunelab.config import build
from tunelab.engine.build import build_parts
from tunelab.engine.recipe import core_callbacks
from tunelab.errors import TunelabError

ON = "++perf.activation_checkpointing=true"  # ++: whether or not conf/train.yaml lists the key
IMAGE = ["model.pretrained=false", "data.image_size=32", "module.batchnorm=eval", "retention.enabled=false",
         "strategy=full"]
# drop-path / dropout on: the recomputed forward must replay the forward's random draws
MODELS = {
    "timm_cnn": lambda req: [*IMAGE, "model.arch=test_efficientnet", "model.drop_path_rate=0.2"],
    "timm_vit": lambda req: [*IMAGE, "model=vit_tiny", "model.arch=test_vit", "model.drop_path_rate=0.2"],
    "hf_text": lambda req: ["model=hf_text", f"model.path={req.getfixturevalue('tiny_bert')}", "data=drug_reviews",
                            "data.max_length=16", "retention.enabled=false", "strategy=full"],
}


def batch(parts):
    torch.manual_seed(1)
    if parts.adapter.modality == "text":
        x = parts.datamodule.first_inputs("val", 4)
    else:
        x = torch.randn(4, 3, 32, 32)
    return x, torch.randint(0, parts.datamodule.num_outputs, (4,))


def gradients(cfg_factory, overrides: list[str]) -> tuple[dict, int, object]:
    """Every parameter's gradient after one training-mode forward and backward of the module,
    the bytes autograd saved for the backward pass, and the parts."""
    torch.manual_seed(0)
    parts = build_parts(cfg_factory(*overrides))
    module = parts.module.train()
    x, y = batch(parts)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(2)  # the same dropout / drop-path draws in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(module(x), y)
    loss.backward()
    return {n: p.grad for n, p in module.model.named_parameters()}, sum(saved), parts


@pytest.mark.parametrize("model", list(MODELS))
def test_gradients_with_checkpointing_equal_gradients_without(cfg_factory, request, model):
    plain, plain_saved, _ = gradients(cfg_factory, MODELS[model](request))
    checked, checked_saved, parts = gradients(cfg_factory, [*MODELS[model](request), ON])
    assert all(g is not None for g in plain.values())  # every parameter took part, head to stem
    assert plain.keys() == checked.keys()
    for name in plain:
        assert torch.allclose(plain[name], checked[name], rtol=1e-5, atol=1e-7), name
    # it really checkpointed: the blocks kept their inputs only (less than half of what plain autograd saves)
    assert checked_saved < plain_saved / 2, (checked_saved, plain_saved)
    parts.module.eval()  # and evaluation reads the same model
    with torch.no_grad():
        x, _ = batch(parts)
        assert parts.module(x).shape[0] == 4


@pytest.mark.parametrize("model", ["timm_vit", "hf_text"])
def test_trainable_layers_above_frozen_ones_get_their_gradients(cfg_factory, request, model, monkeypatch):
    """Reentrant checkpointing gives a block no gradient when its input needs none (a frozen stem
    or frozen embeddings): tunelab checkpoints non-reentrantly, even when timm's process-wide
    default (TIMM_REENTRANT_CKPT) says reentrant."""
    import timm.layers.config

    monkeypatch.setattr(timm.layers.config, "_USE_REENTRANT_CKPT", True)
    # head + the top layers train; the stem / embeddings do not
    overrides = [*MODELS[model](request), "strategy=milestones", "strategy.stages=[{at_epoch: 0, unfreeze: 2}]"]

    def trained(*extra):
        torch.manual_seed(0)
        parts = build_parts(cfg_factory(*overrides, *extra))
        parts.module.set_stage(0)
        x, y = batch(parts)
        torch.manual_seed(2)
        F.cross_entropy(parts.module.train()(x), y).backward()
        return {n: p.grad for n, p in parts.module.model.named_parameters() if p.requires_grad}

    plain, checked = trained(), trained(ON)
    assert plain.keys() == checked.keys() and len(plain) > 2
    for name in plain:
        assert checked[name] is not None, f"{name} got no gradient"
        assert torch.allclose(plain[name], checked[name], rtol=1e-5, atol=1e-7), name


def test_composes_with_torch_compile(cfg_factory):
    """Compiled (aot_eager: dynamo + AOTAutograd, no C++ build) with checkpointing: the eager
    model's gradients, and still fewer bytes saved for the backward than compiled without."""
    common = [*MODELS["timm_vit"](None), "perf.compile=true", "perf.compile_backend=aot_eager"]

    def compiled(*extra):
        torch.manual_seed(0)
        parts = build_parts(cfg_factory(*common, *extra))
        parts.module.set_stage(0)
        assert parts.module.compiles == 1
        x, y = batch(parts)
        parts.module.train()(x)  # compile outside the measured pass
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            torch.manual_seed(2)
            loss = F.cross_entropy(parts.module(x), y)
        loss.backward()
        return {n: p.grad for n, p in parts.module.model.named_parameters()}, sum(saved)

    eager, _, _ = gradients(cfg_factory, MODELS["timm_vit"](None))
    plain, plain_saved = compiled()
    checked, checked_saved = compiled(ON)
    for name in eager:
        assert torch.allclose(eager[name], checked[name], rtol=1e-4, atol=1e-6), name
    assert checked_saved < plain_saved


def test_cached_features_still_train_the_same_head(cfg_factory):
    """A linear probe on cached features never runs the backbone; checkpointing it changes nothing:
    the cache is built (under no_grad) and the head trains to the same weights step by step."""
    common = [*IMAGE, "model.arch=test_efficientnet", "strategy=linear_probe", "data.augment=null",
              "data.max_train_samples=48", "data.batch_size=16", "trainer.limit_train_batches=1.0",
              "trainer.limit_val_batches=1.0", "trainer.max_epochs=2", "callbacks=none", "perf.cache_features=true"]

    def fit(*extra):
        torch.manual_seed(0)
        cfg = cfg_factory(*common, *extra)
        parts = build_parts(cfg)
        inputs, losses = [], []

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                losses.append(float(outputs["loss"]))
                inputs.append(type(batch[0]).__name__)

        trainer = build(cfg.trainer, "trainer", logger=False, enable_checkpointing=False,
                        callbacks=[*core_callbacks(parts), Record()])
        trainer.fit(parts.module, datamodule=parts.datamodule)
        head = set(parts.adapter.groups[-1].param_names)
        return losses, inputs, {n: p.detach() for n, p in parts.module.model.named_parameters() if n in head}

    plain_losses, _, plain_head = fit()
    losses, inputs, head = fit(ON)
    assert set(inputs) == {"BackboneFeatures"} and len(losses) == 6
    assert losses == pytest.approx(plain_losses, abs=1e-6)
    for name in head:
        assert torch.allclose(head[name], plain_head[name], atol=1e-6), name


@pytest.mark.parametrize("overrides, message", [
    (["model.arch=dla46_c"], r"timm dla46_c has no activation checkpointing"),
    (["model.arch=test_efficientnet", "module.batchnorm=train"], r"module\.batchnorm=train would update the BatchNorm"),
    (["model.arch=test_efficientnet", "module.batchnorm=frozen_eval"], r"module\.batchnorm=frozen_eval would update"),
])
def test_what_cannot_checkpoint_exactly_is_refused_in_one_line(cfg_factory, overrides, message):
    mode = [o for o in overrides if o.startswith("module.batchnorm")]
    cfg = cfg_factory(*[o for o in IMAGE if not (mode and o.startswith("module.batchnorm"))], *overrides, ON)
    with pytest.raises(TunelabError, match=message) as err:
        build_parts(cfg)
    assert "\n" not in str(err.value) and "perf.activation_checkpointing" in str(err.value)


def test_bad_value_is_rejected_before_training(cfg_factory):
    with pytest.raises(TunelabError, match=r"perf\.activation_checkpointing"):
        build_parts(cfg_factory(*IMAGE, "model.arch=test_efficientnet", "++perf.activation_checkpointing=maybe"))


def test_batchnorm_statistics_would_update_twice_without_the_refusal():
    """Positive control for the refusal above: timm's checkpointed CNN in batch-statistics mode
    counts each batch twice in its running statistics (the recomputed forward updates them too)."""
    import timm

    tracked = []
    for on in (False, True):
        torch.manual_seed(0)
        model = timm.create_model("test_efficientnet", num_classes=3).train()
        model.set_grad_checkpointing(on)
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        tracked.append(max(int(m.num_batches_tracked) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)))
    assert tracked == [1, 2]


@pytest.mark.slow  # a real tunelab-train process: ~20 s
def test_trains_under_debug_smoke(tmp_path):
    proc = train_cli(tmp_path, "module.batchnorm=eval", ON)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [r for r in mlflow_runs(tmp_path) if "perf.activation_checkpointing" in r.data.params]
    assert run.info.status == "FINISHED"
    assert run.data.params["perf.activation_checkpointing"] == "True"
    assert run.data.metrics["train/loss"] > 0
