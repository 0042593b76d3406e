"""The loss group, class imbalance (class weights, the balanced sampler) and mixup / cutmix:
each against its closed form on a fixed batch, and each shipped choice through a real run."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy

from tunelab.cli.train import train
from tunelab.config import conf_dir
from tunelab.engine import losses
from tunelab.data.sampling import EpochSampler
from tunelab.engine.build import build_parts
from tunelab.engine.losses import (
    BinaryCrossEntropy, CrossEntropy, FocalLoss, Huber, balanced_weights, task_default,
)
from tunelab.engine.mixing import BatchMixer
from tunelab.errors import TunelabError

FAST = ["model.arch=test_efficientnet", "model.pretrained=false", "retention.enabled=false",
        "data.image_size=32", "data.max_train_samples=64"]
LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 2.5]])
LABELS = torch.tensor([0, 2, 1, 1])


def _log_p_true() -> torch.Tensor:
    return torch.stack([LOGITS[i].exp()[LABELS[i]].log() - LOGITS[i].exp().sum().log() for i in range(len(LABELS))])


def test_weighted_cross_entropy_is_the_weighted_mean_of_negative_log_likelihoods():
    weights = [0.5, 2.0, 1.0]
    expected = -sum(weights[y] * lp for y, lp in zip(LABELS.tolist(), _log_p_true())) / sum(weights[y] for y in LABELS)
    assert CrossEntropy(weights=weights, num_outputs=3)(LOGITS, LABELS).item() == pytest.approx(expected.item(), rel=1e-6)


def test_balanced_weights_follow_scikit_learns_formula():
    # n / (classes present × count); a class without training samples weighs nothing
    assert balanced_weights([10, 30, 0]).tolist() == pytest.approx([40 / (2 * 10), 40 / (2 * 30), 0.0])
    loss = CrossEntropy(weights="balanced", class_counts=[10, 30, 0])
    assert "balanced" in loss.describe() and "2, 0.667, 0" in loss.describe()


def test_focal_loss_equals_its_closed_form_and_gamma_zero_is_cross_entropy():
    log_p = _log_p_true()
    expected = (-(1 - log_p.exp()) ** 2 * log_p).mean()
    assert FocalLoss(gamma=2.0)(LOGITS, LABELS).item() == pytest.approx(expected.item(), rel=1e-6)
    assert FocalLoss(gamma=0.0)(LOGITS, LABELS).item() == pytest.approx(F.cross_entropy(LOGITS, LABELS).item(), rel=1e-6)
    w = torch.tensor([1.0, 3.0, 0.5])
    weighted = (w[LABELS] * -(1 - log_p.exp()) ** 2 * log_p).sum() / w[LABELS].sum()
    assert FocalLoss(gamma=2.0, weights=w.tolist(), num_outputs=3)(LOGITS, LABELS).item() == pytest.approx(
        weighted.item(), rel=1e-6)


def test_multilabel_focal_and_bce_equal_their_closed_forms():
    targets = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 1]])
    p = LOGITS.sigmoid()
    t = targets.float()
    bce = -(t * p.log() + (1 - t) * (1 - p).log())
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = 0.25 * t + 0.75 * (1 - t)
    focal = FocalLoss(gamma=2.0, alpha=0.25, task="multilabel")(LOGITS, targets)
    assert focal.item() == pytest.approx((alpha_t * (1 - p_t) ** 2 * bce).mean().item(), rel=1e-5)
    # balanced positive weights: negatives / positives per label, counted on the training split
    loss = BinaryCrossEntropy(pos_weight="balanced", class_counts=[2, 2, 3], num_samples=4)
    assert loss.pos_weight.tolist() == pytest.approx([1.0, 1.0, 1 / 3])
    pw = loss.pos_weight
    expected = -(pw * t * p.log() + (1 - t) * (1 - p).log()).mean()
    assert loss(LOGITS, targets).item() == pytest.approx(expected.item(), rel=1e-5)


def test_huber_is_quadratic_inside_delta_and_linear_beyond():
    out, y = torch.tensor([0.0, 0.0]), torch.tensor([0.5, 3.0])
    assert Huber(delta=1.0)(out, y).item() == pytest.approx((0.5 * 0.5**2 + (3.0 - 0.5)) / 2)


def test_losses_refuse_what_they_cannot_take(cfg_factory):
    with pytest.raises(TunelabError, match=r"has 2 values but the data has 3 classes"):
        CrossEntropy(weights=[1.0, 2.0], num_outputs=3)
    with pytest.raises(TunelabError, match=r"loss.weights must be null, balanced or a list"):
        CrossEntropy(weights="inverse")
    with pytest.raises(TunelabError, match=r"^the loss Huber is for regression data but data.task=classification; "
                                           r"choose one of loss=auto, loss=cross_entropy, loss=focal"):
        build_parts(cfg_factory(*FAST, "loss=huber"))


def test_no_loss_named_is_the_tasks_usual_one():
    assert {t: type(task_default(t)).__name__ for t in ("classification", "multilabel", "regression")} == {
        "classification": "CrossEntropy", "multilabel": "BinaryCrossEntropy", "regression": "MeanSquaredError"}


# -- the balanced sampler ---------------------------------------------------------------------

def test_balanced_sampler_draws_every_class_about_equally_and_is_a_function_of_seed_and_epoch():
    labels = torch.tensor([0] * 90 + [1] * 9 + [2] * 1)  # 90 : 9 : 1
    weights = 1.0 / torch.bincount(labels).double()[labels]
    sampler = EpochSampler(len(labels), seed=3, weights=weights)
    counts = Counter()
    orders = []
    for epoch in range(20):
        sampler.set_epoch(epoch)
        order = [i for _, i in sampler]
        orders.append(order)
        counts.update(labels[order].tolist())
    assert len(orders[0]) == 100 and orders[0] != orders[1]
    # 2,000 draws, each class with probability 1/3: every count within 5 standard deviations of 667
    assert all(abs(counts[c] - 2000 / 3) < 5 * math.sqrt(2000 * (1 / 3) * (2 / 3)) for c in range(3)), counts
    again = EpochSampler(len(labels), seed=3, weights=weights)
    again.set_epoch(7)
    again.skip = 40  # a run resumed 40 samples into epoch 7 sees the rest of the same order
    assert [i for _, i in again] == orders[7][40:]


def test_balanced_sampler_in_a_datamodule_and_refused_for_regression(cfg_factory, image_folder):
    parts = build_parts(cfg_factory(*FAST, "data.sampler=balanced"))
    dm = parts.datamodule
    sampler = dm.train_sampler(dm.split_sizes()["train"])
    table, idx = dm.splits["train"]
    drawn = np.bincount(table.labels[idx][[i for _, i in sampler]], minlength=dm.num_classes)
    present = np.bincount(table.labels[idx], minlength=dm.num_classes)
    assert drawn.sum() == len(idx) and (drawn[present == 0] == 0).all()
    with pytest.raises(TunelabError, match=r"data.sampler=balanced draws classes equally often: it needs a "
                                           r"classification task, not regression"):
        build_parts(cfg_factory(*FAST, *_regression_csv(image_folder), "data.sampler=balanced"))


# -- mixup / cutmix -----------------------------------------------------------------------------

def _images(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1, 2][:n])


@pytest.mark.parametrize("alphas", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)], ids=["mixup", "cutmix", "both"])
def test_mixed_targets_are_distributions_and_the_loss_equals_timms(alphas):
    mixer = BatchMixer(3, "classification", "image", seed=1, mixup_alpha=alphas[0], cutmix_alpha=alphas[1])
    x, y = _images()
    mixed, soft = mixer(x, y, step=5)
    assert torch.allclose(soft.sum(1), torch.ones(6)) and not torch.equal(mixed, x)
    lam = soft[0, y[0]].item() if y[0] != y[-1] else None
    assert lam is not None and 0 <= lam <= 1
    assert torch.allclose(soft, mixup_target(y, 3, lam))  # the batch mixed with itself reversed, weight lam
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    smoothing = 0.1  # the loss smooths the mixed targets exactly as timm's own smoothing does
    ours = CrossEntropy(label_smoothing=smoothing)(logits, soft)
    assert ours.item() == pytest.approx(SoftTargetCrossEntropy()(logits, mixup_target(y, 3, lam, smoothing)).item(),
                                        rel=1e-6)
    again, _ = mixer(x, y, step=5)  # a function of (seed, step, rank): what a resumed run needs
    assert torch.equal(again, mixed) and not torch.equal(mixer(x, y, step=6)[0], mixed)
    assert not torch.equal(mixer(x, y, step=5, rank=1)[0], mixed)


def test_an_odd_batch_keeps_its_last_sample_unmixed():
    x, y = _images(5)
    mixed, soft = BatchMixer(3, "classification", "image", mixup_alpha=1.0, cutmix_alpha=0.0)(x, y, step=0)
    assert torch.equal(mixed[4], x[4]) and soft[4].tolist() == [0.0, 1.0, 0.0]  # its own label, y[4] = 1
    assert torch.allclose(soft.sum(1), torch.ones(5))


@pytest.mark.parametrize("overrides,message", [
    (["data=drug_reviews", "model=minilm", "retention.enabled=false"], r"mixes images and their labels; it cannot apply to text inputs"),
    ([*FAST, "loss=focal"], r"mixup gives class probabilities as targets, which the loss FocalLoss does not take"),
    ([*FAST, "perf.cache_features=true", "strategy=linear_probe"], r"cache would change training: mixup/cutmix mixes"),
    ([*FAST, "mixup.mixup_alpha=0"], r"mixup.mixup_alpha and mixup.cutmix_alpha are both 0"),
])
def test_mixup_is_refused_in_one_line_where_it_cannot_apply(cfg_factory, overrides, message):
    with pytest.raises(TunelabError, match=message) as err:
        build_parts(cfg_factory("mixup=mixup", *overrides))
    assert "\n" not in str(err.value)


def test_regression_mixup_is_refused(cfg_factory):
    mixer = OmegaConf.load(conf_dir() / "mixup" / "mixup.yaml")
    with pytest.raises(TunelabError, match=r"it cannot apply to data.task=regression"):
        BatchMixer(1, "regression", "image", mixup_alpha=mixer.mixup_alpha)


# -- every shipped choice trains -------------------------------------------------------------------

def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def _tasks(loss: str) -> tuple[str, ...]:
    target = OmegaConf.load(conf_dir() / "loss" / f"{loss}.yaml")._target_
    return getattr(losses, target.rsplit(".", 1)[1]).tasks


def _regression_csv(image_folder) -> list[str]:
    images = sorted(image_folder.rglob("*.png"))  # class_<k>/ holds brightness k: its score is k.5
    rows = ["path,score", *(f"{p.relative_to(image_folder)},{p.parent.name[-1]}.5" for p in images)]
    (image_folder / "scores.csv").write_text("\n".join(rows) + "\n")
    return ["data=image_csv", f"data.source.path={image_folder / 'scores.csv'}", "data.source.label_column=score",
            "data.task=regression", "data.objective=val/mse", "data.objective_mode=min"]


TINY_RUN = ["model.arch=test_efficientnet", "model.pretrained=false", "retention.enabled=false", "data.image_size=32",
            "strategy=full", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "callbacks=none"]


@pytest.mark.parametrize("group,choice", [("loss", c) for c in _choices("loss")] + [("mixup", c) for c in _choices("mixup")])
def test_every_loss_and_mixup_choice_trains_under_smoke(cfg_factory, image_folder, group, choice):
    """A real fit (debug=smoke) per shipped choice, on data of a task the choice fits."""
    if group == "loss" and "classification" not in _tasks(choice) and "regression" not in _tasks(choice):
        pytest.skip(f"loss={choice} fits multi-label data only: tests/data/test_multilabel.py trains it")
    data = (_regression_csv(image_folder) if group == "loss" and "classification" not in _tasks(choice)
            else ["data=image_folder", f"data.source.root={image_folder}"])
    metrics = train(cfg_factory(*TINY_RUN, *data, f"{group}={choice}"))
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["test/loss"])


def test_class_weights_are_logged_with_the_stage_table(cfg_factory):
    parts = build_parts(cfg_factory(*FAST, "loss=weighted_cross_entropy"))
    counts = parts.datamodule.class_counts()
    expected = balanced_weights(counts)
    line = next(n for n in parts.notes if n.startswith("loss:"))
    assert line.endswith("[" + ", ".join(f"{w:.3g}" for w in expected.tolist()) + "]") and line in parts.stage_table()
    assert torch.equal(parts.module.loss_fn.weight, expected) and sum(counts) == parts.datamodule.split_sizes()["train"]


def test_macro_f1_is_a_valid_objective(cfg_factory):
    parts = build_parts(cfg_factory(*FAST, "data.objective=val/f1"))
    assert parts.datamodule.objective == "val/f1"
