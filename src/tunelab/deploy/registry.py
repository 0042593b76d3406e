"""Put a run's fine-tuned model into MLflow's model registry as a pyfunc model.

Every run logs its best checkpoint, which carries its resolved config and model meta (task,
classes, input settings); registering builds an MLflow model from it, so a
sweep registers only its best trial and no run pays for logging a model nobody asked for.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from tunelab.config.redaction import redact_value
from tunelab.data.modalities import PAIR_COLUMN, modality_of
from tunelab.data.preprocess import example_input
from tunelab.engine.trained import from_run
from tunelab.tracking import tag_names
from tunelab.tracking.store import mlflow_uris_kept


# MLflow copies this file beside the model and runs it on load ("models from code"). It is read,
# not imported: defining its PythonModel makes MLflow print a type-hint warning that MLflow's
# own decorator forces on, into every command that merely imports the registry.
PYFUNC_MODEL = Path(__file__).with_name("pyfunc_model.py")


def _example(meta: dict):
    """What a client sends to the served model: a column of raw inputs (two for text pairs)."""
    import pandas as pd


    kind, settings = modality_of(meta), meta["preprocess"]
    example = {kind.name: [example_input(settings)]}
    if settings.get("pairs"):
        example[PAIR_COLUMN] = [example_input(settings)]
    return pd.DataFrame(example)


def register_run_model(client: MlflowClient, run_id: str, name: str) -> str:
    """Log ``run_id``'s model as an MLflow pyfunc model and register it; returns ``models:/name/N``.
    A name read from the environment is withheld like every other record (redaction.py)."""
    import mlflow


    name = redact_value(name)

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a file or three, no bars


    with tempfile.TemporaryDirectory() as tmp:
        trained = from_run(client, run_id, Path(tmp))
        # MLflow copies the code file with its mode (0644 in the package): a copy written under
        # tunelab's umask keeps the logged model owner-only like the rest of the store (umask.py)
        code = Path(tmp, PYFUNC_MODEL.name)
        code.write_bytes(PYFUNC_MODEL.read_bytes())
        with mlflow_uris_kept(point_at=client._tracking_client.tracking_uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(code),
                artifacts=_artifacts(trained),
                input_example=_example(trained.meta),
                pip_requirements=["tunelab"],
                registered_model_name=name,
            )
    version = info.registered_model_version
    client.set_tag(run_id, tag_names.REGISTERED_MODEL, f"{name}/{version}")
    return f"models:/{name}/{version}"


def _artifacts(trained) -> dict[str, str]:
    """The checkpoint, which carries its config and meta; the two files only for runs from before
    checkpoints did (the pyfunc reads them then)."""
    files = {"config": trained.config_path, "meta": trained.meta_path}
    return {"checkpoint": str(trained.checkpoint), **{k: str(v) for k, v in files.items() if v is not None}}
