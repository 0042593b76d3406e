"""Multi-label classification (data.task=multilabel): both table layouts load alike, splits are
seeded and stratified by each row's rarest label, the metrics equal a hand computation, the
shipped MNIST-5k attribute example learns, and eval / export / predict / serving give every
label's sigmoid probability with its name. Bad input is one line before any run exists."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from conftest import compose_cfg, write_image_folder
from helpers.runs import TINY_MODEL, nothing_written, save_test_images
from tunelab.cli import export as export_cli
from tunelab.cli import predict as predict_cli
from tunelab.cli.train import train
from tunelab.config import build
from tunelab.data.datamodule import stratified_split
from tunelab.data.multilabel import multilabel_strata
from tunelab.data.preprocess import Preprocessor, encode_image, load_image
from tunelab.data.sources import load_image_csv, load_mnist5k, load_mnist5k_attributes
from tunelab.data.text import load_text_table
from tunelab.deploy.evaluate import evaluate
from tunelab.engine import evaluation
from tunelab.engine.build import build_parts
from tunelab.engine.metrics import multilabel_metrics
from tunelab.engine.trained import Predictor, from_checkpoint, load_adapter
from tunelab.errors import TunelabError
from tunelab.tracking.store import mlflow_uris_kept, tracking_uri

# Six examples, three labels; label 2 has no positive (its AP is undefined: left out of mAP).
PROBS = torch.tensor([[0.9, 0.2, 0.6], [0.8, 0.7, 0.1], [0.3, 0.6, 0.4],
                      [0.6, 0.1, 0.2], [0.2, 0.4, 0.7], [0.1, 0.9, 0.3]])
TARGETS = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
# By hand at threshold 0.5 -- label 0: predicted {0, 1, 3}, true {0, 1, 4}: TP 2, FP 1, FN 1, F1 4/6;
# label 1: predicted = true = {1, 2, 5}: F1 1; label 2: predicted {0, 4}, none true: F1 0.
# Micro: TP 5, FP 3, FN 1 -> 10/14. Exact rows: 1, 2, 5 -> 3/6.
# AP, label 0 ranked 0.9+ 0.8+ 0.6- 0.3- 0.2+ 0.1-: (1/1 + 2/2 + 3/5) / 3; label 1 ranks its positives first: 1.
HAND = {"f1": (4 / 6 + 1 + 0) / 3, "f1_micro": 10 / 14, "exact_match": 3 / 6, "map": ((1 + 1 + 3 / 5) / 3 + 1) / 2}
# At threshold 0.65 -- label 0: {0, 1}: TP 2, FN 1 -> 0.8; label 1: {1, 5}: TP 2, FN 1 -> 0.8; label 2: {4}: 0.
# Micro: TP 4, FP 1, FN 2 -> 8/11. mAP does not depend on the threshold.
HAND_065 = {"f1": (0.8 + 0.8 + 0) / 3, "f1_micro": 8 / 11, "map": HAND["map"]}
ATTRIBUTES = ["even", "at_least_5", "closed_loop", "prime"]
TINY_IMAGES = [*TINY_MODEL, "data.image_size=32"]


def test_metrics_match_a_hand_computation():
    logits = torch.logit(PROBS)
    metrics = multilabel_metrics(3, threshold=0.5)
    metrics.update(logits[:4], TARGETS[:4].float())  # two batches, float targets as the loss takes them
    metrics.update(logits[4:], TARGETS[4:].float())
    logged = {k: float(v) for k, v in metrics.compute().items()}
    report = evaluation.multilabel_report(evaluation.Outputs(logits, TARGETS, ["a", "b", "c"]), threshold=0.5)
    for name, value in HAND.items():
        assert logged[name] == pytest.approx(value, abs=1e-6), name
        assert report[name] == pytest.approx(value, abs=1e-6), name
    assert [report[f"f1_class/{c}"] for c in "abc"] == pytest.approx([4 / 6, 1, 0], abs=1e-6)
    at_065 = evaluation.multilabel_report(evaluation.Outputs(logits, TARGETS), threshold=0.65)
    for name, value in HAND_065.items():
        assert at_065[name] == pytest.approx(value, abs=1e-6), name


def _write_tables(root: Path) -> tuple[Path, Path, list[list[str]]]:
    """Two CSVs of the same 18 images and labels: names joined by | and one 0/1 column per label."""
    write_image_folder(root, classes=3, per_class=6, size=16)
    names = {0: ["a"], 1: ["a", "b"], 2: ["b", "c"]}
    images = sorted(root.rglob("*.png"))
    rows = [names[int(p.parent.name[-1])] for p in images]
    paths = [str(p.relative_to(root)) for p in images]
    pd.DataFrame({"path": paths, "tags": ["|".join(r) for r in rows]}).to_csv(root / "tags.csv", index=False)
    pd.DataFrame({"path": paths, **{c: [int(c in r) for r in rows] for c in "abc"}}).to_csv(root / "cols.csv", index=False)
    return root / "tags.csv", root / "cols.csv", rows


def test_names_joined_by_a_separator_and_label_columns_load_alike(tmp_path):
    tags, cols, rows = _write_tables(tmp_path / "images")
    by_names = load_image_csv(str(tags), label_column="tags", task="multilabel")
    by_columns = load_image_csv(str(cols), label_column=["a", "b", "c"], task="multilabel")
    expected = np.array([[int(c in r) for c in "abc"] for r in rows])
    assert by_names.classes == by_columns.classes == ["a", "b", "c"]
    assert np.array_equal(by_names.labels, expected) and np.array_equal(by_columns.labels, expected)
    # another separator; a column order other than sorted names the labels in that order
    pd.read_csv(tags).assign(tags=lambda f: f.tags.str.replace("|", ";")).to_csv(tmp_path / "semi.csv", index=False)
    semi = load_image_csv(str(tmp_path / "semi.csv"), label_column="tags", task="multilabel", label_separator=";",
                          root=str(tmp_path / "images"))
    assert np.array_equal(semi.labels, expected)
    reordered = load_image_csv(str(cols), label_column=["c", "a"], task="multilabel", allow_empty=True)
    assert reordered.classes == ["c", "a"] and np.array_equal(reordered.labels, expected[:, [2, 0]])

    texts = pd.DataFrame({"text": [f"text {i}" for i in range(len(rows))], "tags": ["|".join(r) for r in rows],
                          **{c: [int(c in r) for r in rows] for c in "abc"}})
    texts.to_csv(tmp_path / "texts.csv", index=False)
    text_names = load_text_table(str(tmp_path / "texts.csv"), label_column="tags", task="multilabel")
    text_columns = load_text_table(str(tmp_path / "texts.csv"), label_column=["a", "b", "c"], task="multilabel")
    assert np.array_equal(text_names.labels, expected) and np.array_equal(text_columns.labels, expected)


def test_a_composed_config_yields_label_rows_and_positives_per_label(tmp_path):
    tags, _, rows = _write_tables(tmp_path / "images")
    cfg = compose_cfg(tmp_path, [*TINY_IMAGES, "data=image_csv", f"data.source.path={tags}", "data.source.label_column=tags",
                                 "data.task=multilabel", "data.objective=val/map", "data.val_fraction=0.2",
                                 "data.test_fraction=0.2"])
    dm = build(cfg.data, "data").scan()
    assert dm.num_outputs == 3 and dm.classes == ["a", "b", "c"] and dm.objective == "val/map"
    table, idx = dm.splits["train"]
    assert dm.class_counts() == table.labels[idx].sum(0).tolist() and sum(dm.class_counts()) > len(idx)
    dm.set_model_data_config({"mean": (0.5,) * 3, "std": (0.5,) * 3})
    _, y = next(iter(dm.loader("train", training=True)))
    assert y.shape == (min(8, len(idx)), 3) and y.dtype == torch.int64 and set(y.unique().tolist()) <= {0, 1}


def test_splits_are_seeded_and_stratified_by_the_rarest_label():
    rng = np.random.default_rng(0)
    labels = (rng.random((400, 3)) < [0.6, 0.5, 0.0]).astype(np.int64)
    labels[:40, 2] = 1  # a rare label: 10 %
    strata = multilabel_strata(labels)
    rarest = np.where(labels[:, 2] == 1, 2, np.where(labels.any(1), np.argmin(np.where(labels, labels.sum(0), 10**9), 1), 3))
    assert np.array_equal(strata, rarest)
    test, val, train_idx = stratified_split(strata, (0.2, 0.1), seed=5)
    assert all(np.array_equal(a, b) for a, b in zip((test, val, train_idx), stratified_split(strata, (0.2, 0.1), 5)))
    assert labels[test, 2].sum() == 8 and labels[val, 2].sum() == 4  # the rare label, in proportion
    assert len(set(test) | set(val) | set(train_idx)) == 400


def test_mnist_attributes_are_the_configured_digits():
    digits = load_mnist5k()
    table = load_mnist5k_attributes({"even": [0, 2, 4, 6, 8], "prime": [2, 3, 5, 7]})
    assert table.classes == ["even", "prime"] and table.labels.shape == (5000, 2)
    assert np.array_equal(table.labels[:, 0], digits.labels % 2 == 0)
    assert np.array_equal(table.labels[:, 1], np.isin(digits.labels, [2, 3, 5, 7]))
    with pytest.raises(TunelabError, match=r"data.source.attributes.big must list classes .*0..9.*got \[12\]"):
        load_mnist5k_attributes({"big": [12]})


def _fails(tmp_path: Path, overrides: list[str], pattern: str) -> None:
    cfg = compose_cfg(tmp_path, [*TINY_IMAGES, *overrides])
    with pytest.raises(TunelabError, match=pattern) as caught:
        train(cfg)
    assert "\n" not in str(caught.value), str(caught.value)
    nothing_written(tmp_path)


MULTILABEL = ["data.task=multilabel", "data.objective=val/map"]


@pytest.mark.parametrize("case,overrides,pattern", [
    ("unknown label column", ["data.source.label_column=[a,zzz]"],
     r"cols.csv has no column 'zzz' \(columns: path, a, b, c\)\. Set data.source.label_column=\[<column names>\]"),
    ("row without a label", ["data.source.label_column=[b]"],
     r"6 of 18 rows have no label \(line 2, line 3, line 4 and 3 more\); .* data.source.allow_empty=true"),
    ("balanced sampler", ["data.sampler=balanced"],
     r"data.sampler=balanced draws classes equally often: it needs a classification task, not multilabel"),
    ("list of columns, single-label task", ["data.task=classification", "data.objective=val/acc"],
     r"label_column=\['a', 'b', 'c'\] lists one 0/1 column per label, which is for data.task=multilabel"),
    ("single-label objective", ["data.objective=val/acc"],
     r"data.objective='val/acc' is not a validation metric of a multilabel task; use one of val/loss, val/map"),
    ("threshold", ["data.threshold=1.5"], r"data.threshold must be in \(0, 1\), got 1.5"),
])
def test_bad_input_is_one_line_before_any_run(tmp_path, case, overrides, pattern):
    _, cols, _ = _write_tables(tmp_path / "images")
    _fails(tmp_path, ["data=image_csv", f"data.source.path={cols}", "data.source.label_column=[a,b,c]", *MULTILABEL,
                      *overrides], pattern)


def test_bad_label_values_and_one_label_folders_are_one_line(tmp_path):
    _, cols, _ = _write_tables(tmp_path / "images")
    frame = pd.read_csv(cols)
    frame.loc[4, "b"] = 2
    two = tmp_path / "images" / "two.csv"
    frame.to_csv(two, index=False)
    _fails(tmp_path, ["data=image_csv", f"data.source.path={two}", "data.source.label_column=[a,b,c]",
                      *MULTILABEL], r"two.csv column 'b', line 6: 2 is not 0 or 1")
    _fails(tmp_path, ["data=image_folder", f"data.source.root={tmp_path / 'images'}", *MULTILABEL],
           r"data.task=multilabel needs several 0/1 labels per example, but .* gives one class per example")


def test_a_smoke_run_logs_multilabel_metrics_with_balanced_positive_weights(cfg_factory):
    cfg = cfg_factory(*TINY_IMAGES, "data=mnist5k_attributes", "loss=bce", "loss.pos_weight=balanced",
                      "data.max_train_samples=64")
    parts = build_parts(cfg)
    table, idx = parts.datamodule.splits["train"]
    positives = table.labels[idx].sum(0)
    assert torch.allclose(parts.module.loss_fn.pos_weight, torch.tensor((64 - positives) / positives, dtype=torch.float))
    metrics = train(cfg)
    assert {f"{s}/{m}" for s in ("val", "test") for m in ("map", "f1", "f1_micro", "exact_match")} <= set(metrics)
    assert not {"train/acc", "test/acc", "test/auroc"} & set(metrics) and math.isfinite(metrics["test/loss"])
    meta = json.loads(Path(cfg.paths.output_dir, "model_meta.json").read_text())
    assert meta["task"] == "multilabel" and meta["classes"] == ATTRIBUTES and meta["threshold"] == 0.5


@pytest.mark.slow
def test_the_shipped_example_learns_the_digit_attributes(cfg_factory):
    """EfficientNet-Lite0 (ImageNet weights): an epoch of 15 batches of 32 on the head, one on all
    layers. Measured: val/map 0.919, test/map 0.934 (chance: about 0.45, the positive rate)."""
    cfg = cfg_factory("data=mnist5k_attributes", "retention.enabled=false", "trainer.max_epochs=2",
                      "trainer.limit_train_batches=15", "data.batch_size=32", "trainer.limit_val_batches=1",
                      "trainer.limit_test_batches=1", "data.eval_batch_size=256")
    metrics = train(cfg)
    assert metrics["val/map"] > 0.8 and metrics["test/map"] > 0.8, metrics


@pytest.mark.slow  # 6 s on an idle 2-core machine, 27 s under load: training, export, registry, serving
def test_eval_export_predict_and_serving_give_each_labels_probability(cfg_factory, tmp_path):
    cfg = cfg_factory(*TINY_IMAGES, "data=mnist5k_attributes", "logger.register_best=attributes")
    train(cfg)
    best = next(Path(cfg.paths.output_dir, "checkpoints").glob("epoch*.ckpt"))
    trained = from_checkpoint(best)
    predictor = Predictor(load_adapter(trained), "multilabel").eval()
    folder = save_test_images(cfg, tmp_path / "new")
    images = sorted(str(p) for p in folder.iterdir())
    with torch.no_grad():
        expected = torch.sigmoid(predictor(Preprocessor(trained.meta["preprocess"])(images))).numpy()

    # tunelab-eval: the test split's metrics, as scikit-learn computes them from the same probabilities
    found = evaluate(str(best), [], "test", log=False).metrics
    dm = build(cfg.data, "data").scan()
    dm.set_model_data_config(load_adapter(trained).data_config)
    out = evaluation.predict(predictor, dm.loader("test"))
    probs, y = torch.sigmoid(out.scores).numpy(), out.targets.numpy()
    assert found["test/map"] == pytest.approx(average_precision_score(y, probs, average="macro"), abs=1e-4)
    assert found["test/f1"] == pytest.approx(f1_score(y, probs > 0.5, average="macro", zero_division=0), abs=1e-4)
    assert found["test/f1_micro"] == pytest.approx(f1_score(y, probs > 0.5, average="micro"), abs=1e-4)
    assert {f"test/f1_class/{a}" for a in ATTRIBUTES} <= set(found)

    # tunelab-export (parity) and tunelab-predict: names above the threshold, and every label's probability
    export_cli.main([str(best), "--out", str(tmp_path / "export")])
    meta = json.loads((tmp_path / "export" / "tunelab_export.json").read_text())
    assert meta["activation"] == "sigmoid" and meta["classes"] == ATTRIBUTES and meta["threshold"] == 0.5
    assert max(meta["formats"][f]["max_abs_diff"] for f in ("onnx", "torchscript")) <= 1e-3
    for runtime in ("onnx", "torchscript"):
        predict_cli.main([str(tmp_path / "export"), str(folder), "--out", str(tmp_path / "p.csv"), "--runtime", runtime])
        predicted = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
        assert list(predicted.columns) == ["input", "labels", *(f"prob_{a}" for a in ATTRIBUTES)]
        np.testing.assert_allclose(predicted[[f"prob_{a}" for a in ATTRIBUTES]].to_numpy(), expected, atol=1e-4)
        assert list(predicted["labels"]) == ["|".join(a for a, p in zip(ATTRIBUTES, row) if p > 0.5) for row in expected]

    # the registered pyfunc model, as `mlflow models serve` runs it: posted images in, the same columns out
    with mlflow_uris_kept(point_at=tracking_uri(cfg)):  # then back: later tests must not inherit it
        served = mlflow.pyfunc.load_model("models:/attributes/1").predict(
            pd.DataFrame({"image": [encode_image(load_image(p)) for p in images]}))
    np.testing.assert_allclose(served[[f"prob_{a}" for a in ATTRIBUTES]].to_numpy(), expected, atol=1e-5)
    assert list(served["labels"]) == list(predicted["labels"])
