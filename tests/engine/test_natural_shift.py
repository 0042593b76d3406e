"""The natural distribution shift (scikit-learn's digits) and the label-free forgetting measure
(agreement of the pretrained ImageNet predictions on scikit-image's natural images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import compose_cfg
from tunelab.config import build
from tunelab.data.sources import load_mnist5k, load_sklearn_digits
from tunelab.engine.retention import imagenet_agreement, natural_images, snapshot
from tunelab.errors import TunelabError


def ink_box(image: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(image.max(1)), np.flatnonzero(image.max(0))
    return rows.min(), rows.max(), cols.min(), cols.max()


def test_sklearn_digits_are_other_writers_framed_like_mnist():
    digits = load_sklearn_digits()
    assert digits.items.shape == (1797, 28, 28) and digits.items.dtype == np.uint8
    assert digits.classes == load_mnist5k().classes and np.bincount(digits.labels).min() >= 170
    top, bottom, left, right = np.array([ink_box(im) for im in digits.items]).T
    assert top.min() >= 4 and left.min() >= 4 and bottom.max() <= 23 and right.max() <= 23  # MNIST's 4 px margin
    assert digits.items.max() == 255 and not digits.items.flags.writeable  # shared by every caller
    assert not {im.tobytes() for im in digits.items[:50]} & {im.tobytes() for im in load_mnist5k().items}
    assert load_sklearn_digits(size=64, margin=0).items.shape == (1797, 64, 64)
    with pytest.raises(TunelabError, match="leaves under 8 px"):
        load_sklearn_digits(size=20, margin=7)


def test_the_shipped_digits_config_evaluates_sklearn_digits_built_once(tmp_path):
    dm = build(compose_cfg(tmp_path, []).data, "data")
    dm.set_model_data_config({})
    assert "sklearn_digits" in dm.ood_names()
    load_sklearn_digits.cache_clear()
    first, again = dm.ood_dataset("sklearn_digits"), dm.ood_dataset("sklearn_digits")
    assert first.table is again.table and load_sklearn_digits.cache_info().misses == 1
    images, labels = next(iter(dm.ood_loader("sklearn_digits")))
    assert images.shape[1:] == (3, dm.image_size, dm.image_size) and len(first) == 1797
    assert labels.tolist() == load_sklearn_digits().labels[:len(labels)].tolist()


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    cfg = compose_cfg(tmp_path_factory.mktemp("cfg"), [])
    adapter = build(cfg.model, "model", num_outputs=10, image_size=64)
    head = next(g for g in adapter.groups if g.name == "head").param_names
    return adapter, head


def test_agreement_is_one_for_an_untouched_model_and_drops_after_full_fine_tuning_at_a_high_lr(lite0):
    adapter, head = lite0
    images = natural_images(adapter.data_config)
    assert images.shape == (220, 3, 224, 224)  # 19 photos, both stereo views, 200 lfw_subset crops
    assert natural_images(adapter.data_config) is images  # built once
    pretrained = snapshot(adapter.model)
    assert imagenet_agreement(pretrained, adapter.model, head, adapter.pretrained_head, images) == (1.0, 0.0)

    tuned = snapshot(adapter.model).train()
    for p in tuned.parameters():
        p.requires_grad_(True)
    digits = load_mnist5k()
    x = torch.tensor(digits.items[:32], dtype=torch.float32).div(255).sub(0.5).div(0.5)
    x, y = x[:, None].expand(-1, 3, -1, -1).contiguous(), torch.tensor(digits.labels[:32])
    optimizer = torch.optim.SGD(tuned.parameters(), lr=0.5)  # every layer, a high LR: forgetting
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(tuned(x), y).backward()
        optimizer.step()
    agreement, kl = imagenet_agreement(pretrained, tuned.eval(), head, adapter.pretrained_head, images)
    assert agreement < 0.9 and kl > 0.1, (agreement, kl)


def test_the_kl_is_the_mean_kl_of_the_two_prediction_sets(lite0):
    adapter, head = lite0
    images = natural_images(adapter.data_config)[:8]
    noisy = snapshot(adapter.model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.02 * p.abs().mean(), alpha=1.0)
    agreement, kl = imagenet_agreement(adapter.model, noisy, head, adapter.pretrained_head, images)
    with torch.no_grad():
        logits = [adapter.pretrained_head(m.forward_features(images).mean((2, 3))) for m in (adapter.model, noisy)]
    expected = torch.nn.functional.kl_div(logits[1].log_softmax(1), logits[0].log_softmax(1), log_target=True,
                                          reduction="batchmean")
    assert kl == pytest.approx(float(expected), rel=1e-3, abs=1e-6) and kl > 0
    assert agreement == pytest.approx(float((logits[0].argmax(1) == logits[1].argmax(1)).float().mean()))
