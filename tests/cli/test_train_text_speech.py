"""Text and speech runs end to end: real Trainer, real MLflow store, the configs users pick
with model= and data=, and the claim that pretraining helps (measured, slow)."""

from __future__ import annotations

import numpy as np
import pytest

from tunelab.cli.train import train
from conftest import only_run, run_cli, path_table, skip_without_espeak, write_audio_folder

pytestmark = pytest.mark.slow

CLASSIFICATION = {"val/acc", "val/f1", "test/acc", "test/precision", "test/recall", "test/f1", "train/loss"}
REGRESSION = {"val/mse", "val/mae", "val/r2", "test/mse", "test/mae", "test/r2", "train/loss"}


# (model/data overrides, task): every new model and data config, under debug=smoke
RUNS = {
    "minilm+drug_reviews": (lambda req, tmp: ["model=minilm", "data=drug_reviews"], CLASSIFICATION),
    "minilm+drug_reviews_regression": (lambda req, tmp: ["model=minilm", "data=drug_reviews_regression"], REGRESSION),
    "gpt2+text_table": (lambda req, tmp: ["model=hf_text", f"model.path={req.getfixturevalue('tiny_gpt2')}",
                                          "data=text_table", f"data.source.path={req.getfixturevalue('text_csv')}"],
                        CLASSIFICATION),
    "wav2vec2_tiny+spoken_digits": (lambda req, tmp: ["model=wav2vec2_tiny", "data=spoken_digits",
                                                      f"data.source.root={req.getfixturevalue('spoken_digits')}"],
                                    CLASSIFICATION),
    "hubert_tiny+audio_folder": (lambda req, tmp: ["model=hubert_tiny", "data=audio_folder",
                                                   f"data.source.root={req.getfixturevalue('audio_folder')}"],
                                 CLASSIFICATION),
    "hf_speech+audio_csv": (lambda req, tmp: ["model=hf_speech", f"model.path={req.getfixturevalue('tiny_hubert')}",
                                              "data=audio_csv", f"data.source.path={path_table(write_audio_folder(tmp / 'clips'), '*.wav')}",
                                              "data.max_seconds=0.3"], CLASSIFICATION),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_smoke_run_is_tracked(name, cfg_factory, request, tmp_path):
    overrides, expected = RUNS[name]
    cfg = cfg_factory(*overrides(request, tmp_path))
    metrics = train(cfg)
    client, run = only_run(cfg)
    assert run.info.status == "FINISHED"
    assert expected <= set(run.data.metrics), sorted(expected - set(run.data.metrics))
    assert {k: v for k, v in metrics.items() if k.startswith("test/")} == pytest.approx(
        {k: v for k, v in run.data.metrics.items() if k.startswith("test/")})
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "stage_table.txt", "lr_schedule.png", "checkpoints"} <= artifacts
    table = open(client.download_artifacts(run.info.run_id, "stage_table.txt")).read()
    assert "head" in table and ("layer.0" in table)


def test_readme_text_command(tmp_path):
    result = run_cli(tmp_path, "model=minilm", "data=drug_reviews", "debug=smoke")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FINISHED" in result.stdout and "test/acc" in result.stdout and "tunelab-ui --store" in result.stdout


def test_readme_speech_command_synthesises_its_data(tmp_path):
    skip_without_espeak()
    result = run_cli(tmp_path, "model=wav2vec2_tiny", "data=spoken_digits", "debug=smoke")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((tmp_path / "data" / "spoken_digits").glob("*/*.wav"))) == 960
    assert "FINISHED" in result.stdout


def test_hub_id_not_on_disk_fails_before_any_run(tmp_path):
    result = run_cli(tmp_path, "model=hf_text", "model.path=roberta-base", "data=drug_reviews", "debug=smoke",
                  f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2
    assert "not in the Hugging Face cache; tunelab never downloads" in result.stderr
    assert "Traceback" not in result.stderr


def test_pretrained_minilm_beats_majority_and_random_init(cfg_factory):
    """The seeds' first claim on text: same architecture, same budget, pretrained vs random.

    Scored by macro-F1: 65% of the test reviews are positive, so accuracy hides a model that
    only says "positive" (that majority baseline has macro-F1 0.26, accuracy 0.654)."""
    budget = ["model=minilm", "data=drug_reviews", "strategy=full", "optimizer.lr=1e-4", "data.max_length=96",
              "trainer.max_epochs=3", "trainer.limit_train_batches=1.0", "trainer.limit_val_batches=1.0",
              "trainer.limit_test_batches=1.0", "data.batch_size=16", "data.eval_batch_size=64", "callbacks=none"]
    pretrained = train(cfg_factory(*budget))
    random_init = train(cfg_factory(*budget, "model.pretrained=false", "logger.experiment_name=random"))
    from tunelab.data.text import load_drug_reviews

    table = load_drug_reviews()
    majority_class = np.bincount(table.labels).argmax()
    majority_acc = float(np.mean(table.test.labels == majority_class))
    share = majority_acc  # F1 of the majority class when it is always predicted; the others score 0
    majority_f1 = 2 * share / (1 + share) / len(table.classes)
    print(f"\nMiniLM on drug reviews (test): pretrained acc {pretrained['test/acc']:.3f} F1 {pretrained['test/f1']:.3f}; "
          f"random init acc {random_init['test/acc']:.3f} F1 {random_init['test/f1']:.3f}; "
          f"majority acc {majority_acc:.3f} F1 {majority_f1:.3f}")
    assert pretrained["test/f1"] >= majority_f1 + 0.08, (pretrained, majority_f1)
    assert pretrained["test/f1"] >= random_init["test/f1"] + 0.08, (pretrained, random_init)
    assert pretrained["test/acc"] > max(majority_acc, random_init["test/acc"])
