"""val/auroc and test/auroc: macro one-vs-rest AUROC from softmax probabilities, the same number at
training and in tunelab-eval's report, and a classes-present rule (with a warning) for short splits."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tunelab.cli.train import train
from tunelab.config import build
from tunelab.engine.build import build_parts
from tunelab.engine.evaluation import Outputs, classification_report, macro_auroc, predict
from tunelab.engine.metrics import SoftmaxAUROC
from tunelab.engine.stage_callback import StageCallback
from conftest import only_run

sklearn_metrics = pytest.importorskip("sklearn.metrics")

# A tiny random-weight model; eval batches of 4 over MNIST-5k's 10 digits, so classes are always missing.
TINY = ["model.arch=test_efficientnet", "model.pretrained=false", "data.image_size=32", "data.eval_batch_size=4",
        "retention.enabled=false"]
DIGITS = [*TINY, "data.ood=null"]
MISSING = re.compile(r"^(val|test)/auroc over \d of 10 classes: classes \d(, \d)* have no samples in this split$")


def _known(n: int = 60, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    logits = torch.randn(n, classes, generator=g) + 0.8 * torch.nn.functional.one_hot(y, classes)  # some signal
    return logits, y


def _sklearn_over(present, probs: torch.Tensor, y: torch.Tensor) -> float:
    """sklearn's one-vs-rest definition, class by class, averaged over ``present``."""
    return float(np.mean([sklearn_metrics.roc_auc_score((y == c).numpy(), probs[:, c].numpy()) for c in present]))


@pytest.mark.parametrize("classes", [4, 2])
def test_auroc_matches_sklearn_ovr_macro(classes):
    logits, y = _known(classes=classes)
    probs = logits.softmax(dim=1)
    expected = sklearn_metrics.roc_auc_score(y.numpy(), probs.numpy() if classes > 2 else probs[:, 1].numpy(),
                                             multi_class="ovr", average="macro")
    value, missing = macro_auroc(probs, y, classes)
    assert missing == [] and float(value) == pytest.approx(expected, abs=1e-6)
    metric = SoftmaxAUROC(classes)  # fed logits, batch by batch, as in a validation epoch
    for chunk in range(0, len(y), 16):
        metric.update(logits[chunk:chunk + 16], y[chunk:chunk + 16])
    assert float(metric.compute()[0]) == pytest.approx(expected, abs=1e-6)
    assert classification_report(Outputs(logits, y))["auroc"] == pytest.approx(expected, abs=1e-6)


def test_logits_inside_0_1_are_still_softmaxed():
    """torchmetrics would rank such logits raw; softmax changes each class's ranking."""
    logits, y = _known()
    logits = (logits - logits.min()) / (logits.max() - logits.min())  # every value in [0, 1]
    metric = SoftmaxAUROC(4)
    metric.update(logits, y)
    expected = sklearn_metrics.roc_auc_score(y.numpy(), logits.softmax(1).numpy(), multi_class="ovr")
    assert float(metric.compute()[0]) == pytest.approx(expected, abs=1e-6)


def test_missing_classes_average_over_present_and_warn(caplog):
    logits, y = _known(n=70, classes=10)
    keep = ~torch.isin(y, torch.tensor([3, 8, 9]))
    logits, y = logits[keep], y[keep]
    probs = logits.softmax(dim=1)
    value, missing = macro_auroc(probs, y, 10)
    assert missing == [3, 8, 9]
    assert float(value) == pytest.approx(_sklearn_over([0, 1, 2, 4, 5, 6, 7], probs, y), abs=1e-6)
    with caplog.at_level("WARNING", logger="tunelab"):
        report = classification_report(Outputs(logits, y), prefix="val/")
    assert report["auroc"] == pytest.approx(float(value))
    assert caplog.messages == ["val/auroc over 7 of 10 classes: classes 3, 8, 9 have no samples in this split"]


def _rank_auroc(rank: int, port: int, logits: torch.Tensor, y: torch.Tensor, folder) -> None:
    torch.set_num_threads(1)  # a forked child inherits the parent's OpenMP pool broken: its first op would hang
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        metric = SoftmaxAUROC(10)
        shard = (y < 5) if rank == 0 else (y >= 5)  # each rank alone lacks half of the classes
        metric.update(logits[shard], y[shard])
        torch.save(metric.compute(), folder / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_ranks_gather_predictions_before_the_missing_class_rule(tmp_path):
    """Under DDP compute() sees every rank's predictions: no class is missing from the whole split."""
    import socket

    import torch.multiprocessing as mp

    logits, y = _known(n=80, classes=10)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork, as Lightning's ddp_fork: spawn would re-import this module and Lightning in each rank (a minute)
    mp.start_processes(_rank_auroc, args=(port, logits, y, tmp_path), nprocs=2, start_method="fork")
    expected = sklearn_metrics.roc_auc_score(y.numpy(), logits.softmax(1).numpy(), multi_class="ovr")
    for rank in (0, 1):
        value, missing = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert float(value) == pytest.approx(expected, abs=1e-6) and missing == [], rank


def test_one_class_present_is_not_logged_and_says_why(caplog):
    logits, _ = _known(n=8, classes=10)
    y = torch.full((8,), 5)
    assert macro_auroc(logits.softmax(1), y, 10) == (None, [0, 1, 2, 3, 4, 6, 7, 8, 9])
    with caplog.at_level("WARNING", logger="tunelab"):
        report = classification_report(Outputs(logits, y), prefix="test/")
    assert "auroc" not in report and "acc" in report
    assert caplog.messages == ["test/auroc not logged: 1 of 10 classes has samples in this split; "
                               "one-vs-rest AUROC needs at least two"]


@pytest.mark.slow
def test_training_logs_auroc_to_mlflow_and_warns_once_per_split(cfg_factory, caplog):
    cfg = cfg_factory(*DIGITS, "trainer.limit_val_batches=1")  # debug=smoke: 2 epochs, 2 test batches
    with caplog.at_level("WARNING", logger="tunelab"):
        metrics = train(cfg)
    client, run = only_run(cfg)
    for key in ("val/auroc", "test/auroc"):
        assert 0.0 <= metrics[key] <= 1.0 and run.data.metrics[key] == pytest.approx(metrics[key]), key
    assert len(client.get_metric_history(run.info.run_id, "val/auroc")) == 2  # one per epoch
    notes = [m for m in caplog.messages if "/auroc" in m]
    assert [m.split("/")[0] for m in notes] == ["val", "test"], notes  # once per split, not per epoch
    assert all(MISSING.match(m) for m in notes), notes


def _fit(cfg):
    """A plain Lightning fit of the built module, no MLflow."""
    parts = build_parts(cfg)
    trainer = build(cfg.trainer, "trainer", logger=False, enable_checkpointing=False, callbacks=[StageCallback()])
    trainer.fit(parts.module, datamodule=parts.datamodule)
    return parts, trainer


def test_training_and_eval_report_agree_on_the_same_batches(cfg_factory, caplog):
    parts, trainer = _fit(cfg_factory(*DIGITS, "trainer.limit_val_batches=1", "trainer.max_epochs=1", "callbacks=none"))
    with caplog.at_level("WARNING", logger="tunelab"):
        (logged,) = trainer.test(parts.module, datamodule=parts.datamodule, verbose=False)
        out = predict(parts.module, parts.datamodule.test_dataloader(), max_batches=2)  # limit_test_batches
        report = classification_report(out, prefix="test/")
    assert report["auroc"] == pytest.approx(logged["test/auroc"], abs=1e-6)
    notes = [m for m in caplog.messages if m.startswith("test/auroc")]
    assert len(notes) == 2 and notes[0] == notes[1] and MISSING.match(notes[0]), notes  # training, then eval


def test_a_plateau_schedule_can_follow_val_auroc(cfg_factory):
    """val/auroc is logged before the schedule reads the epoch's metrics, not after."""
    parts, trainer = _fit(cfg_factory(*DIGITS, "scheduler=plateau", "scheduler.monitor=val/auroc", "scheduler.mode=max",
                                      "trainer.limit_val_batches=1", "callbacks=none"))
    assert "val/auroc" in trainer.callback_metrics and trainer.current_epoch == 2


def test_regression_logs_no_auroc(cfg_factory, image_folder):
    images = sorted(image_folder.rglob("*.png"))  # class_<k>/ holds brightness k: its score is k.5
    rows = ["path,score", *(f"{p.relative_to(image_folder)},{p.parent.name[-1]}.5" for p in images)]
    (image_folder / "scores.csv").write_text("\n".join(rows) + "\n")
    parts, trainer = _fit(cfg_factory(
        *TINY, "data=image_csv", f"data.source.path={image_folder / 'scores.csv'}", "data.source.label_column=score",
        "data.task=regression", "data.objective=val/mse", "data.objective_mode=min", "trainer.max_epochs=1",
        "callbacks=none"))
    (logged,) = trainer.test(parts.module, datamodule=parts.datamodule, verbose=False)
    assert parts.module.auroc is None and "test/mse" in logged
    assert not any("auroc" in k for k in [*logged, *trainer.callback_metrics])
