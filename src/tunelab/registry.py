"""Put a run's fine-tuned model into MLflow's model registry as a pyfunc model.

Every run logs its best checkpoint, its resolved config and ``model_meta.json`` (task,
classes, input settings); registering builds an MLflow model from those three files, so a
sweep registers only its best trial and no run pays for logging a model nobody asked for.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from tunelab.errors import TunelabError


def model_meta(parts) -> dict:
    dm, adapter = parts.datamodule, parts.adapter
    meta = {"task": dm.task, "modality": adapter.modality, "num_outputs": dm.num_outputs,
            "classes": dm.classes if dm.task == "classification" else [], "model_kwargs": dm.model_kwargs}
    size = adapter.data_config.get("input_size") if adapter.modality == "image" else None
    image_size = dm.model_kwargs.get("image_size")
    if size:
        meta["input_shape"] = [int(size[0]), *([int(image_size)] * 2 if image_size else map(int, size[1:]))]
    return meta


def _example(meta: dict):
    import numpy as np

    if meta["modality"] == "text":
        return ["an example sentence"]
    if meta["modality"] == "audio":
        return np.zeros((1, 16000), dtype=np.float32)
    return np.zeros((1, *meta.get("input_shape", [3, 224, 224])), dtype=np.float32)


def register_run_model(client: MlflowClient, run_id: str, name: str) -> str:
    """Log ``run_id``'s model as an MLflow pyfunc model and register it; returns ``models:/name/N``."""
    import mlflow

    from tunelab import pyfunc_model

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # three files, no bars

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoints = [p for p in Path(client.download_artifacts(run_id, "checkpoints", str(folder))).glob("*.ckpt")]
        if not checkpoints:
            raise TunelabError(f"run {run_id} logged no checkpoint (callbacks.model_checkpoint was off), "
                               "so it has no model to register.")
        config = client.download_artifacts(run_id, "config.yaml", str(folder))
        meta_path = client.download_artifacts(run_id, "model_meta.json", str(folder))
        meta = json.loads(Path(meta_path).read_text())
        mlflow.set_tracking_uri(client._tracking_client.tracking_uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=pyfunc_model.__file__,
                artifacts={"checkpoint": str(checkpoints[0]), "config": config, "meta": meta_path},
                input_example=_example(meta),
                pip_requirements=["tunelab"],
                registered_model_name=name,
            )
    version = info.registered_model_version
    client.set_tag(run_id, "tunelab.registered_model", f"{name}/{version}")
    return f"models:/{name}/{version}"
