"""tunelab-eval: the numbers training logged come back; bad sources and data say what is wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tunelab.cli import eval as eval_cli
from tunelab.deploy.evaluate import evaluate
from tunelab.cli.train import train
from tunelab.errors import TunelabError
from tunelab.tracking.store import tracking_uri
from conftest import write_image_folder


@pytest.fixture(scope="module")
def trained_smoke(tmp_path_factory):
    """One smoke run whose test pass covers the whole test split, like tunelab-eval does."""
    from conftest import compose_cfg

    tmp = tmp_path_factory.mktemp("trained")
    cfg = compose_cfg(tmp, ["trainer.limit_test_batches=1.0", "data.eval_batch_size=100"])
    train(cfg)
    client = MlflowClient(tracking_uri(cfg))
    run = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])[0]
    return cfg, run, client


@pytest.mark.slow
def test_eval_of_a_run_reproduces_the_test_metrics_logged_at_training(trained_smoke, monkeypatch):
    cfg, run, client = trained_smoke
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(cfg))
    result = evaluate(f"runs:/{run.info.run_id}")
    metrics = result.metrics
    for key in ("test/acc", "test/f1", "test/precision", "test/recall", "test/auroc"):
        assert metrics[key] == pytest.approx(run.data.metrics[key], abs=1e-4), key
    assert 0.0 <= metrics["test/ece"] <= 1.0 and "test/auroc" in metrics
    assert sum(k.startswith("test/f1_class/") for k in metrics) == 10
    assert "test/acc" in result.table() and result.logged.startswith("logged as MLflow run ")

    assert not [r for r in client.search_runs([run.info.experiment_id]) if r.data.tags.get("tunelab.kind")]
    evals = client.search_runs([client.get_experiment_by_name("tunelab-eval").experiment_id])
    assert len(evals) == 1 and evals[0].data.tags["tunelab.eval_of"] == run.info.run_id
    assert evals[0].info.status == "FINISHED"
    assert {"confusion_matrix.png", "reliability.png"} <= {a.path for a in client.list_artifacts(evals[0].info.run_id)}


@pytest.mark.slow
def test_eval_of_a_checkpoint_path_needs_its_run_folder(trained_smoke, tmp_path):
    cfg, run, _ = trained_smoke
    ckpt = next(Path(cfg.paths.output_dir, "checkpoints").glob("epoch*.ckpt"))
    metrics = evaluate(str(ckpt), split="val", log=False).metrics
    assert "val/acc" in metrics
    lonely = tmp_path / "elsewhere" / "checkpoints" / "model.ckpt"
    lonely.parent.mkdir(parents=True)
    shutil.copy(ckpt, lonely)
    # checkpoints carry their config now (a lone copy evaluates: tests/trust/test_trust_stored.py);
    # one from before that needs its run folder
    checkpoint = torch.load(lonely, weights_only=True)
    checkpoint["tunelab"] = {k: v for k, v in checkpoint["tunelab"].items() if k not in ("config", "meta")}
    torch.save(checkpoint, lonely)
    with pytest.raises(TunelabError, match="resolved_config.yaml.*training config"):
        evaluate(str(lonely), log=False)


@pytest.mark.slow
def test_eval_on_data_with_other_classes_is_refused(trained_smoke, tmp_path):
    cfg, _, _ = trained_smoke
    ckpt = next(Path(cfg.paths.output_dir, "checkpoints").glob("epoch*.ckpt"))
    images = write_image_folder(tmp_path / "images", classes=3)
    with pytest.raises(TunelabError, match="trained on 10 classes.*has 3"):
        evaluate(str(ckpt), ["data=image_folder", f"data.source.root={images}"], log=False)


def test_eval_cli_rejects_non_data_overrides_and_bad_sources(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main([str(tmp_path / "nothing.ckpt")])
    assert exit_info.value.code == 2 and "no checkpoint at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_cli.main(["models:/only-a-name"])
    assert "models:/NAME/VERSION" in capsys.readouterr().err
