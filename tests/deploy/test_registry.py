"""Model registry round trip: register a run's model, load it by models:/, same predictions."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from tunelab.cli.train import train
from tunelab.data.preprocess import encode_image
from tunelab.data.preprocess import load_image
from tunelab.engine.build import build_parts
from tunelab.tracking.store import mlflow_uris_kept, tracking_uri


@pytest.mark.slow
def test_registered_model_loads_by_name_and_predicts_like_the_checkpoint(cfg_factory):
    cfg = cfg_factory("logger.register_best=smoke_digits")
    train(cfg)
    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    versions = client.search_model_versions("name='smoke_digits'")
    assert [str(v.version) for v in versions] == ["1"]
    run = client.get_run(versions[0].run_id)
    assert run.info.status == "FINISHED" and run.data.tags["tunelab.registered_model"] == "smoke_digits/1"

    with mlflow_uris_kept(point_at=uri):  # then back: later tests must not inherit this store
        served = mlflow.pyfunc.load_model("models:/smoke_digits/1")

    # The same weights, loaded the way a user would from the run's best checkpoint.
    parts = build_parts(cfg)
    best = [p for p in Path(cfg.paths.output_dir, "checkpoints").glob("epoch*.ckpt")]
    assert len(best) == 1
    state = torch.load(best[0], map_location="cpu", weights_only=True)["state_dict"]
    parts.module.load_state_dict(state, strict=False)
    parts.module.eval()
    dm = parts.datamodule
    dm.setup("test")
    images, labels = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        expected = torch.softmax(parts.module(images), dim=-1).numpy()

    # what a client sends: the raw test images, base64-encoded; the model preprocesses them
    table, indices = dm.splits["test"]
    raw = [encode_image(load_image(table.items[j])) for j in indices[: len(images)]]
    frame = served.predict(pd.DataFrame({"image": raw}))
    probs = frame[[f"prob_{c}" for c in dm.classes]].to_numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert list(frame["label"]) == [dm.classes[i] for i in expected.argmax(axis=1)]
    with pytest.raises(Exception, match="image"):  # the signature names the column it needs
        served.predict(pd.DataFrame({"pixels": ["x"]}))
