"""Test-time augmentation in tunelab-eval (``tta=``): the averaged probabilities are the mean of the
model's softmax over the views, a mirror-symmetric image gains nothing from flipping, the eval
command logs and prints both the plain and the augmented metrics, and non-image data is refused."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import compose_cfg, write_text_csv
from helpers.runs import TINY_MODEL
from tunelab.cli import eval as eval_cli
from tunelab.deploy import tta
from tunelab.deploy.evaluate import evaluate
from tunelab.engine.trained import Predictor

SIDE = 7  # the views' side in the unit tests; the batches are 9 px: crops cut 2 px off each side


def tiny_predictor(task: str = "classification", stats=(0.0, 1.0)) -> Predictor:
    """A conv net whose flatten + linear reads every pixel where it is: neither mirror- nor shift-
    invariant, so a wrong view changes its answer."""
    torch.manual_seed(0)
    outputs = 5 if task == "classification" else 1
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * (SIDE - 2) ** 2, outputs))
    return Predictor(SimpleNamespace(model=net.eval(), target_stats=stats), task).eval()


def mirror_symmetric(batch: torch.Tensor) -> torch.Tensor:
    """The left half of ``batch`` mirrored onto the right: every image equals its mirror."""
    half = batch[..., : (batch.shape[-1] + 1) // 2]
    return torch.cat([half, half.flip(-1)[..., batch.shape[-1] % 2:]], dim=-1)


def test_flip_of_a_mirror_symmetric_image_is_the_plain_prediction():
    images = torch.randn(4, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    symmetric = mirror_symmetric(images)
    assert torch.equal(symmetric, symmetric.flip(-1))
    with torch.no_grad():
        for task in ("classification", "regression"):
            plain_model = tiny_predictor(task, stats=(2.0, 3.0))
            flipped = tta.Averaged(plain_model, "flip", SIDE)
            plain, averaged = plain_model(symmetric), flipped(symmetric)
            if task == "classification":  # log mean probabilities: their softmax is the plain softmax
                plain, averaged = plain.softmax(-1), averaged.softmax(-1)
            torch.testing.assert_close(averaged, plain, rtol=0, atol=1e-6)
            # positive control: an image that is not its mirror gets another answer
            assert (flipped(images) - plain_model(images)).abs().max() > 1e-3


def hand_views(batch: torch.Tensor, mode: str, s: int) -> list[torch.Tensor]:
    """The views written out by slicing (the batch's side minus ``s`` is even: one centre)."""
    if mode == "flip":
        return [batch, batch.flip(-1)]
    m = (batch.shape[-1] - s) // 2
    crops = [batch[..., :s, :s], batch[..., :s, -s:], batch[..., -s:, :s], batch[..., -s:, -s:],
             batch[..., m:m + s, m:m + s]]
    return crops if mode == "crops" else crops + [c.flip(-1) for c in crops]  # and each crop's mirror


@pytest.mark.parametrize("mode", ["flip", "crops", "flip_crops"])
def test_averaged_probabilities_are_the_mean_softmax_over_the_views(mode):
    size = SIDE if mode == "flip" else SIDE + 2
    batch = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    views = hand_views(batch, mode, SIDE)
    assert len(views) == tta.MODES[mode] and len(tta.views(batch, mode, SIDE)) == tta.MODES[mode]
    with torch.no_grad():
        model = tiny_predictor()
        expected = torch.stack([model(v).softmax(-1) for v in views]).mean(0)
        got = tta.Averaged(model, mode, SIDE)(batch).softmax(-1)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        assert (got - model(views[-1]).softmax(-1)).abs().max() > 1e-3  # not merely one of the views

        regressor = tiny_predictor("regression", stats=(2.0, 3.0))
        mean = torch.stack([regressor(v) for v in views]).mean(0)  # in the targets' units
        torch.testing.assert_close(tta.Averaged(regressor, mode, SIDE)(batch), mean, rtol=0, atol=1e-6)


def test_crops_are_cut_from_a_larger_resize():
    assert tta.resize_for("flip", 64) == 64
    assert tta.resize_for("crops", 64) == tta.resize_for("flip_crops", 64) == 73  # floor(64 / 0.875)
    assert tta.resize_for("crops", 224) == 256  # timm's crop_pct 0.875: ImageNet's 224 of 256


# -- the eval command, on a tiny model trained on images that are their own mirrors -----------------------
def write_symmetric_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 32) -> Path:
    """32 px PNGs (the model's size: no resize), each its own mirror, classes told by brightness."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            half = (rng.random((size, size // 2)) * 60 + c * 80).astype(np.uint8)
            Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)).save(root / f"class_{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def symmetric_run(tmp_path_factory):
    from tunelab.cli.train import train
    from tunelab.tracking.store import tracking_uri

    tmp = tmp_path_factory.mktemp("tta")
    images = write_symmetric_folder(tmp / "images")
    cfg = compose_cfg(tmp, [*TINY_MODEL, "data=image_folder", f"data.source.root={images}", "data.image_size=32",
                            "data.test_fraction=0.25", "data.augment=null"])
    with pytest.MonkeyPatch.context() as env:  # this module's own store, whatever an earlier test left set
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        train(cfg)
        uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    return SimpleNamespace(cfg=cfg, client=client, run_id=run.info.run_id, uri=uri, root=tmp)


def eval_runs(client) -> list:
    experiment = client.get_experiment_by_name("tunelab-eval")
    return client.search_runs([experiment.experiment_id]) if experiment else []


@pytest.mark.slow
def test_eval_logs_and_prints_plain_and_augmented_metrics(symmetric_run, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", symmetric_run.uri)
    eval_cli.main([f"runs:/{symmetric_run.run_id}", "tta=flip"])
    printed = capsys.readouterr().out
    (logged,) = eval_runs(symmetric_run.client)
    metrics = logged.data.metrics
    assert logged.data.tags["tunelab.eval_tta"] == "flip"
    for name in ("acc", "f1", "precision", "recall", "ece", "auroc"):
        # the images are their own mirrors: averaging over the flip changes no number
        assert metrics[f"test/tta/{name}"] == pytest.approx(metrics[f"test/{name}"], abs=1e-5), name
        assert f"test/tta/{name}" in printed and f"test/{name}" in printed
    assert "tta=flip (2 views per image" in printed and "(+0.0000)" in printed
    assert not [k for k in metrics if k.startswith("test/tta/f1_class/")]  # per class: plain only

    # ten views cut from a larger resize, through the real data module and model
    crops = evaluate(f"runs:/{symmetric_run.run_id}", ["tta=flip_crops"], log=False).metrics
    assert {k: v for k, v in crops.items() if "/tta/" not in k} == pytest.approx(
        {k: v for k, v in metrics.items() if "/tta/" not in k}, abs=1e-6)  # the plain metrics are untouched
    assert 0.0 <= crops["test/tta/acc"] <= 1.0 and 0.0 <= crops["test/tta/ece"] <= 1.0


@pytest.mark.slow
def test_tta_is_refused_in_one_line_for_text_data_and_unknown_modes(symmetric_run, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", symmetric_run.uri)
    before = len(eval_runs(symmetric_run.client))
    texts = write_text_csv(symmetric_run.root / "texts.csv")
    source = f"runs:/{symmetric_run.run_id}"
    for args, message in [
        (["data=text_table", f"data.source.path={texts}", "tta=flip"],
         "tunelab-eval: error: tta=flip: test-time augmentation flips and crops images, and this data is text; "),
        (["tta=flp"], "tunelab-eval: error: tta must be flip, crops, flip_crops or null, got 'flp'."),
        (["tta=flip", "optimizer.lr=1"], "tunelab-eval: error: tunelab-eval takes data overrides only"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            eval_cli.main([source, *args])
        errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]  # not MLflow's progress
        assert exit_info.value.code == 2 and len(errors) == 1 and errors[0].startswith(message), errors
    assert len(eval_runs(symmetric_run.client)) == before  # refused before any run
