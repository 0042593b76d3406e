"""Data sources read shipped and user data; splits are deterministic, disjoint, stratified."""

from __future__ import annotations

import numpy as np
import pytest

from tunelab.data.datamodule import stratified_split
from tunelab.data.images import ImageDataModule
from tunelab.data.preprocess import load_image
from tunelab.data.sources import load_fashion_mnist, load_image_csv, load_image_folder, load_mnist5k
from tunelab.errors import TunelabError
from conftest import FASHION_ROOT, skip_without_fashion


def test_stratified_split_is_deterministic_disjoint_and_balanced():
    labels = np.repeat(np.arange(4), 50)
    test, val, train = stratified_split(labels, (0.2, 0.1), seed=3)
    again = stratified_split(labels, (0.2, 0.1), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((test, val, train), again))
    assert not set(test) & set(val) and not set(test) & set(train) and not set(val) & set(train)
    assert len(test) + len(val) + len(train) == 200
    assert np.bincount(labels[test]).tolist() == [10] * 4 and np.bincount(labels[val]).tolist() == [5] * 4
    assert len(set(labels[test[:8]])) > 1, "splits are mixed, not class by class"
    other = stratified_split(labels, (0.2, 0.1), seed=4)[0]
    assert not np.array_equal(test, other)


def test_mnist5k_is_the_shipped_digits():
    table = load_mnist5k()
    assert len(table) == 5000 and table.items.shape[1:] == (28, 28)
    assert np.bincount(table.labels).tolist() == [500] * 10
    assert load_image(table.items[0]).mode == "RGB"  # grayscale -> 3 channels


def test_datamodule_splits_and_transforms():
    dm = ImageDataModule(load_mnist5k, num_classes=10, image_size=32, num_workers=0,
                         augment={"scale": [0.9, 1.0], "hflip": 0.0, "color_jitter": None}).scan()
    assert dm.split_sizes() == {"train": 3500, "val": 500, "test": 1000}
    dm.set_model_data_config({"mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear"})
    x, y = dm.dataset("val")[0]
    assert x.shape == (3, 32, 32) and -1.0 <= float(x.min()) <= float(x.max()) <= 1.0 and 0 <= y < 10
    batch, labels = next(iter(dm.train_dataloader()))
    assert batch.shape == (64, 3, 32, 32) and labels.dtype.is_floating_point is False


def test_max_train_samples_subsets_train_only():
    dm = ImageDataModule(load_mnist5k, max_train_samples=100, num_workers=0).scan()
    assert dm.split_sizes() == {"train": 100, "val": 500, "test": 1000}


def test_samples_per_class_keeps_k_of_each_class_and_seeds_pick_different_ones():
    def train_labels(seed, **kw):
        dm = ImageDataModule(load_mnist5k, seed=seed, num_workers=0, **kw).scan()
        table, idx = dm.splits["train"]
        return idx, table.labels[idx]

    idx, labels = train_labels(0, samples_per_class=5)
    assert np.array_equal(np.bincount(labels), [5] * 10)
    assert np.array_equal(idx, train_labels(0, samples_per_class=5)[0])
    assert not np.array_equal(idx, train_labels(1, samples_per_class=5)[0])
    # the first 5 of each class are also among the first 20 (nested few-shot sets per seed)
    assert set(idx) <= set(train_labels(0, samples_per_class=20)[0])
    # combined with max_train_samples: the cap applies to the few-shot set
    assert len(train_labels(0, samples_per_class=5, max_train_samples=30)[0]) == 30
    with pytest.raises(TunelabError, match="samples_per_class needs a classification task"):
        ImageDataModule(load_mnist5k, task="regression", samples_per_class=5)


def test_samples_per_class_warns_about_classes_with_fewer_examples(image_folder, caplog):
    dm = ImageDataModule(lambda: load_image_folder(str(image_folder)), samples_per_class=50, num_workers=0)
    with caplog.at_level("WARNING", logger="tunelab.data.datamodule"):
        dm.scan()
    table, idx = dm.splits["train"]
    assert len(idx) == sum(np.bincount(table.labels[idx]))  # every class keeps all it has
    assert "data.samples_per_class=50: 3 class(es) have fewer training examples" in caplog.text


def test_min_epoch_samples_repeats_a_small_train_set_with_fresh_order_and_augmentation_per_pass():
    from tunelab.data.sampling import EpochSampler

    sampler = EpochSampler(10, seed=0, min_samples=25)
    keys = list(sampler)
    assert len(sampler) == len(keys) == 30  # three passes of the 10 examples
    passes = [[i for p, i in keys if p == k] for k in range(3)]
    assert all(sorted(p) == list(range(10)) for p in passes) and passes[0] != passes[1]
    sampler.set_epoch(1)
    assert {p for p, _ in sampler} == {3, 4, 5}  # every pass of every epoch draws its own augmentation
    # without repeats the keys are what they always were: (epoch, index)
    plain = EpochSampler(10, seed=0)
    plain.set_epoch(2)
    assert {p for p, _ in plain} == {2} and len(plain) == 10
    dm = ImageDataModule(load_mnist5k, samples_per_class=1, min_epoch_samples=64, batch_size=16,
                         image_size=32, num_workers=0).scan()
    assert len(dm.train_dataloader()) == 5  # 70 samples (7 passes of 10) in batches of 16


def test_image_folder_and_csv(image_folder):
    table = load_image_folder(str(image_folder))
    assert table.classes == ["class_0", "class_1", "class_2"] and len(table) == 18
    csv = image_folder / "labels.csv"
    rows = ["file,kind"] + [f"{p.relative_to(image_folder)},{p.parent.name}" for p in sorted(image_folder.rglob("*.png"))]
    csv.write_text("\n".join(rows) + "\n")
    from_csv = load_image_csv(str(csv), path_column="file", label_column="kind")
    assert from_csv.classes == table.classes and sorted(from_csv.labels) == sorted(table.labels)
    assert load_image(from_csv.items[0]).size == (20, 20)


def test_csv_with_integer_labels(image_folder):
    csv = image_folder / "ints.csv"
    paths = sorted(image_folder.rglob("*.png"))
    csv.write_text("path,label\n" + "".join(f"{p},{i % 4}\n" for i, p in enumerate(paths)))
    table = load_image_csv(str(csv))
    assert table.classes == ["0", "1", "2", "3"] and set(table.labels) == {0, 1, 2, 3}


@pytest.mark.parametrize("loader,kwargs,message", [
    (load_image_folder, {"root": "/no/such/folder"}, "does not exist"),
    (load_image_csv, {"path": "/no/such.csv"}, "no file at"),
    (load_fashion_mnist, {"root": "/no/such/folder"}, "dataset-fashion-mnist"),
])
def test_missing_data_paths_say_what_to_do(loader, kwargs, message):
    with pytest.raises(TunelabError, match=message):
        loader(**kwargs)


def test_empty_folder_and_corrupt_image(tmp_path, image_folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunelabError, match="empty"):
        load_image_folder(str(tmp_path / "empty"))
    (image_folder / "class_0" / "0.png").write_bytes(b"not a png")
    with pytest.raises(TunelabError, match="cannot be read as images"):  # checked when the data is scanned
        load_image_folder(str(image_folder))
    table = load_image_folder(str(image_folder), verify=False)  # else when the image is first loaded
    with pytest.raises(TunelabError, match="cannot read image"):
        load_image(table.items[0])


def test_num_classes_smaller_than_labels_is_rejected(image_folder):
    dm = ImageDataModule(lambda: load_image_folder(str(image_folder)), num_classes=2)
    with pytest.raises(TunelabError, match=r"data.num_classes=2 but .*\(3 classes.*Set data.num_classes=3"):
        dm.scan()


def test_fashion_mnist_ships_its_own_test_split():
    skip_without_fashion()
    dm = ImageDataModule(lambda: load_fashion_mnist(str(FASHION_ROOT)), val_fraction=0.1).scan()
    assert dm.split_sizes() == {"train": 54000, "val": 6000, "test": 10000}
    assert dm.classes[0] == "t-shirt"
