"""Deployment: exports that match PyTorch, tunelab-predict, and `mlflow models serve` answering
posted images with the same labels tunelab-predict gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import VENV_BIN, compose_cfg, write_text_csv
from helpers.runs import save_test_images
from tunelab.cli import export as export_cli
from tunelab.cli import predict as predict_cli
from tunelab.deploy.exported import Exported
from tunelab.cli.train import train
from tunelab.data.preprocess import encode_image
from tunelab.data.preprocess import load_image
from tunelab.engine.trained import Predictor, from_checkpoint, load_adapter
from tunelab.ports import free_port


def best_checkpoint(cfg) -> Path:
    return next(Path(cfg.paths.output_dir, "checkpoints").glob("epoch*.ckpt"))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A smoke EfficientNet-Lite0 on MNIST-5k, registered as models:/digits/1, and 12 test images."""
    tmp = tmp_path_factory.mktemp("digits")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    cfg = compose_cfg(tmp, ["logger.register_best=digits"])
    train(cfg)
    return cfg, save_test_images(cfg, tmp / "new_images")


@pytest.mark.slow
def test_timm_export_matches_pytorch_and_predict_labels_a_folder(digits, tmp_path, capsys):
    cfg, images = digits
    out = tmp_path / "export"
    export_cli.main([str(best_checkpoint(cfg)), "--out", str(out)])
    meta = json.loads((out / "tunelab_export.json").read_text())
    assert meta["formats"]["onnx"]["max_abs_diff"] <= 1e-3 and meta["formats"]["torchscript"]["max_abs_diff"] <= 1e-3
    assert meta["classes"] == [str(i) for i in range(10)] and meta["preprocess"]["size"] == 64
    assert "max |diff| vs PyTorch" in capsys.readouterr().out

    predict_cli.main([str(out), str(images), "--out", str(tmp_path / "p.csv")])
    onnx = pd.read_csv(tmp_path / "p.csv", dtype={"label": str})
    predict_cli.main([str(out), str(images), "--out", str(tmp_path / "t.csv"), "--runtime", "torchscript"])
    assert list(pd.read_csv(tmp_path / "t.csv", dtype={"label": str})["label"]) == list(onnx["label"])

    # the same files through PyTorch and the training-time eval transform
    trained = from_checkpoint(best_checkpoint(cfg))
    adapter = load_adapter(trained)
    from tunelab.data.preprocess import Preprocessor

    batch = Preprocessor(trained.meta["preprocess"])(sorted(str(p) for p in images.iterdir()))
    with torch.no_grad():
        logits = Predictor(adapter, "classification")(batch)
    assert list(onnx["label"]) == [str(int(i)) for i in logits.argmax(1)]
    np.testing.assert_allclose(onnx["confidence"], torch.softmax(logits, 1).max(1).values.numpy(), atol=1e-4)


@pytest.mark.slow
def test_transformers_export_runs_in_onnxruntime_at_any_length(tiny_bert, tmp_path):
    texts = write_text_csv(tmp_path / "texts.csv")
    cfg = compose_cfg(tmp_path, ["model=hf_text", f"model.path={tiny_bert}", "data=text_table",
                                 f"data.source.path={texts}"])
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    train(cfg)
    out = tmp_path / "export"
    export_cli.main([str(best_checkpoint(cfg)), "--out", str(out)])
    meta = json.loads((out / "tunelab_export.json").read_text())
    assert set(meta["formats"]) == {"onnx", "torchscript", "hf"}
    assert meta["formats"]["onnx"]["max_abs_diff"] <= 1e-3
    from transformers import AutoModel

    assert AutoModel.from_pretrained(out / "hf") is not None  # transformers' own format loads back
    assert (out / "preprocess" / "tokenizer_config.json").is_file()

    new = pd.DataFrame({"text": ["great", "the drug was awful and painful for me, I stopped after two weeks of it"]})
    new.to_csv(tmp_path / "new.csv", index=False)
    exported = Exported(out)
    scores = exported.scores(list(new["text"]))
    trained = from_checkpoint(best_checkpoint(cfg))
    adapter = load_adapter(trained)
    with torch.no_grad():
        want = Predictor(adapter, "classification")(exported.preprocess(list(new["text"])))
    np.testing.assert_allclose(scores, want.numpy(), atol=1e-4)  # a length the export never saw


def test_exporting_a_checkpoint_without_its_config_is_refused(tmp_path, capsys):
    lonely = tmp_path / "x" / "checkpoints" / "model.ckpt"
    lonely.parent.mkdir(parents=True)
    torch.save({"state_dict": {}}, lonely)
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main([str(lonely), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "resolved_config.yaml" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_mlflow_models_serve_answers_like_tunelab_predict(digits, tmp_path):
    cfg, images = digits
    out = tmp_path / "export"
    export_cli.main([str(best_checkpoint(cfg)), "--out", str(out), "--format", "onnx"])
    predict_cli.main([str(out), str(images), "--out", str(tmp_path / "p.csv")])
    expected = list(pd.read_csv(tmp_path / "p.csv", dtype={"label": str})["label"])

    port = free_port()
    store = f"sqlite:///{cfg.paths.log_dir}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_REGISTRY_URI": store,
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # serve runs `uvicorn` by name
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([str(VENV_BIN / "mlflow"), "models", "serve", "-m", "models:/digits/1",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow models serve did not start: {(tmp_path / 'serve.log').read_text()[-3000:]}")
                time.sleep(1)
        files = sorted(images.iterdir())
        body = {"dataframe_split": {"columns": ["image"], "data": [[encode_image(load_image(f))] for f in files]}}
        request = urllib.request.Request(url + "/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    served = [str(row["label"]) for row in answer["predictions"]]
    assert served == expected


@pytest.mark.slow
def test_retraining_starts_from_the_registered_model_and_records_lineage(digits, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    first, _ = digits
    store = f"sqlite:///{first.paths.log_dir}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # the store that holds models:/digits/1
    cfg = compose_cfg(tmp_path, ["init_from=models:/digits/1", "strategy=linear_probe"])
    train(cfg)
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id],
                              "tags.`tunelab.init_from` = 'models:/digits/1'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    registered = client.get_model_version("digits", "1")
    assert runs[0].data.tags["tunelab.init_from_run"] == registered.run_id
    before = torch.load(best_checkpoint(first), weights_only=True)["state_dict"]
    after = torch.load(best_checkpoint(cfg), weights_only=True)["state_dict"]
    backbone = [k for k in before if k.startswith("model.") and "classifier" not in k]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)  # a probe keeps what it got


def test_init_from_a_model_that_does_not_fit_is_refused(tmp_path, tiny_bert):
    from tunelab.config import build
    from tunelab.engine.trained import init_from
    from tunelab.errors import TunelabError

    cfg = compose_cfg(tmp_path, ["model=hf_text", f"model.path={tiny_bert}"])
    adapter = build(cfg.model, "model", num_outputs=3)
    ckpt = tmp_path / "run" / "checkpoints" / "x.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {"model.conv_stem.weight": torch.zeros(1)}}, ckpt)
    (tmp_path / "run" / "resolved_config.yaml").write_text("model: {}\n")
    (tmp_path / "run" / "model_meta.json").write_text("{}")
    with pytest.raises(TunelabError, match="none of its weights fit"):
        init_from(adapter, str(ckpt), "sqlite:///" + str(tmp_path / "m.db"))


@pytest.mark.slow
def test_monitor_passes_new_digits_and_flags_inverted_ones(digits, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient
    from PIL import ImageOps

    from tunelab.cli import monitor

    cfg, _ = digits
    from tunelab.config import build

    dm = build(cfg.data, "data").scan()
    table, indices = dm.splits["test"]
    same, inverted = tmp_path / "same", tmp_path / "inverted"
    same.mkdir(), inverted.mkdir()
    for n, j in enumerate(indices[:150]):
        image = load_image(table.items[j])
        image.save(same / f"{n:03d}.png")
        ImageOps.invert(image).save(inverted / f"{n:03d}.png")  # a scanner that flipped black and white
    ckpt = str(best_checkpoint(cfg))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = ["--store", f"{cfg.paths.log_dir}/mlflow.db"]  # a checkpoint's own config never picks the store

    monitor.main([ckpt, str(same), *store])  # returns: exit status 0
    assert "no shift beyond the thresholds (150 inputs)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        monitor.main([ckpt, str(inverted), *store])
    assert exit_info.value.code == monitor.RETRAIN_EXIT
    verdict = capsys.readouterr().out
    assert "re-training recommended:" in verdict and "embedding_shift" in verdict.split("recommended:")[1]

    client = MlflowClient(f"sqlite:///{cfg.paths.log_dir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tunelab-monitor").experiment_id], "tags.`tunelab.kind` = 'monitor'")
    assert sorted(r.data.metrics["monitor/retrain"] for r in runs) == [0.0, 1.0]
    assert all("monitor_report.png" in {a.path for a in client.list_artifacts(r.info.run_id)} for r in runs)


def test_psi_and_embedding_shift_are_zero_for_identical_data_and_grow_with_shift():
    from tunelab.deploy.monitor import embedding_shift, psi

    counts = np.array([50.0, 30.0, 20.0])
    assert psi(counts, counts) == pytest.approx(0.0, abs=1e-9)
    assert psi(counts, np.array([20.0, 30.0, 50.0])) > 0.25
    x = np.random.default_rng(0).normal(size=(500, 16))
    assert embedding_shift(x, x) == pytest.approx(0.0, abs=1e-9)
    assert embedding_shift(x, x + 2.0) > embedding_shift(x, x + 0.5) > 0.0


@pytest.mark.slow
def test_a_lora_model_exports_merged_and_matches(tmp_path):
    cfg = compose_cfg(tmp_path, ["strategy=lora"])
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    train(cfg)
    out = tmp_path / "export"
    export_cli.main([str(best_checkpoint(cfg)), "--out", str(out), "--format", "onnx"])
    meta = json.loads((out / "tunelab_export.json").read_text())
    assert meta["lora_merged"] and meta["formats"]["onnx"]["max_abs_diff"] <= 1e-3
    import onnx

    names = {node.name for node in onnx.load(str(out / "model.onnx")).graph.initializer}
    assert not any("lora" in n.lower() for n in names), "LoRA adapters were exported unmerged"
