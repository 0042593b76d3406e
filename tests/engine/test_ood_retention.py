"""Shifted (OOD) splits and retention, measured at the end of real training runs."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tunelab.cli.train import train
from tunelab.data.sampling import seeded_call
from tunelab.data.shifts import image_shift
from tunelab.engine.retention import linear_cka
from tunelab.errors import TunelabError
from tunelab.tracking.store import tracking_uri


def last_run(cfg):
    client = MlflowClient(tracking_uri(cfg))
    return client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])[0]


@pytest.mark.slow
def test_rotated_digits_lose_accuracy_and_a_linear_probe_keeps_the_backbone(cfg_factory):
    # a linear probe that learns enough to have something to lose
    cfg = cfg_factory("strategy=linear_probe", "optimizer.lr=3e-3", "trainer.max_epochs=2",
                      "trainer.limit_train_batches=60", "data.batch_size=32",
                      "trainer.limit_test_batches=4", "data.eval_batch_size=100")
    metrics = train(cfg)
    assert metrics["test/acc"] > 0.5, metrics["test/acc"]
    assert metrics["ood/rotated/acc"] < metrics["test/acc"]
    assert metrics["ood/rotated/acc_drop"] == pytest.approx(metrics["test/acc"] - metrics["ood/rotated/acc"])
    logged = last_run(cfg).data.metrics
    for name in ("rotated", "noised", "blurred", "low_contrast", "sklearn_digits"):
        assert f"ood/{name}/acc" in logged and f"ood/{name}/acc_drop" in logged
    # the backbone never trained: no drift, the same representation
    assert logged["retention/drift/backbone"] == 0.0
    assert logged["retention/cka"] == pytest.approx(1.0, abs=1e-6)
    # and it still names scikit-image's coffee, cat, rocket and motorcycle photos as ImageNet did
    assert logged["retention/imagenet_top1_pretrained"] == 1.0 == logged["retention/imagenet_top1"]
    assert logged["retention/imagenet_agreement"] == 1.0 and logged["retention/imagenet_kl"] == 0.0


@pytest.mark.slow
def test_full_fine_tuning_moves_the_backbone(cfg_factory):
    metrics = train(cfg_factory("strategy=full"))
    assert metrics["retention/drift/backbone"] > 0
    assert metrics["retention/cka"] < 1.0
    assert all(metrics[k] >= 0 for k in metrics if k.startswith("retention/drift/"))
    assert metrics["retention/imagenet_top1_pretrained"] == 1.0
    assert metrics["retention/imagenet_top1"] <= 1.0
    assert metrics["retention/imagenet_agreement"] < 1.0 and metrics["retention/imagenet_kl"] > 0


def test_linear_cka_is_one_for_rotations_and_low_for_noise():
    import torch

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, torch.randn(64, 8, generator=torch.Generator().manual_seed(2))) < 0.5


def test_shifts_change_the_image_deterministically_and_unknown_ones_are_refused():
    image = Image.new("RGB", (28, 28), 0)
    image.paste((255, 255, 255), (4, 4, 24, 10))
    for name, spec in {"r": {"rotate": 30}, "n": {"noise": 0.2}, "b": {"blur": 1.5}, "c": {"contrast": 0.3}}.items():
        shifted = seeded_call(7, image_shift(name, spec), image)
        assert shifted.size == image.size and shifted.tobytes() != image.tobytes(), name
        assert seeded_call(7, image_shift(name, spec), image).tobytes() == shifted.tobytes(), name
    with pytest.raises(TunelabError, match="data.ood.x: unknown shift.*rotate"):
        image_shift("x", {"twist": 3})


def test_drug_reviews_of_unseen_conditions_form_an_ood_split():
    from tunelab.data.text import load_drug_reviews

    train_table = load_drug_reviews()
    unseen = load_drug_reviews(subset="unseen_conditions")
    assert len(unseen) == 42 and unseen.classes == train_table.classes
    assert set(unseen.items) <= set(train_table.test.items) and not set(unseen.items) & set(train_table.items)
    with pytest.raises(TunelabError, match="subset"):
        load_drug_reviews(subset="rare")


def test_an_image_folder_of_your_own_is_an_ood_split_with_the_same_classes(tmp_path):
    from functools import partial

    from conftest import write_image_folder
    from tunelab.data.images import ImageDataModule
    from tunelab.data.sources import load_image_folder

    task = write_image_folder(tmp_path / "task", classes=3)
    scans = write_image_folder(tmp_path / "scans", classes=3, per_class=4)
    other = write_image_folder(tmp_path / "other", classes=2)
    dm = ImageDataModule(partial(load_image_folder, str(task)), image_size=32,
                         ood={"scans": {"source": partial(load_image_folder, str(scans))},
                              "other": {"source": partial(load_image_folder, str(other))}})
    dm.set_model_data_config({})
    assert dm.ood_names() == ["scans", "other"]
    images, labels = next(iter(dm.ood_loader("scans")))
    assert images.shape[1:] == (3, 32, 32) and len(dm.ood_dataset("scans")) == 12
    with pytest.raises(TunelabError, match="data.ood.other: its classes"):
        dm.ood_dataset("other")


def test_minilm_sentence_pairs_are_a_pretrained_skill_random_init_lacks(tmp_path):
    from conftest import compose_cfg
    from tunelab.config import build
    from tunelab.engine.retention import sentence_similarity

    results = {}
    for pretrained in (True, False):
        cfg = compose_cfg(tmp_path, ["model=minilm", f"model.pretrained={str(pretrained).lower()}"])
        adapter = build(cfg.model, "model", num_outputs=3)
        assert adapter.pretrained_task == ("sentence_similarity" if pretrained else None)
        head = next(g for g in adapter.groups if g.name == "head").param_names
        results[pretrained] = sentence_similarity(adapter.model, head, adapter.data_config["tokenizer"])
    (ranked, margin), (_, random_margin) = results[True], results[False]
    assert ranked == 1.0 and margin > 0.3
    assert random_margin < margin / 2
