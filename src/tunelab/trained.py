"""A trained model back from disk: its config, its metadata and its weights, wherever they are.

A training run leaves three things beside each other: ``resolved_config.yaml`` and
``model_meta.json`` in its output folder (and as MLflow artifacts), and the best checkpoint.
Every after-training command (eval, export, the pyfunc) starts here.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from tunelab.errors import TunelabError

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Trained:
    cfg: DictConfig
    meta: dict
    checkpoint: Path
    run_id: str | None = None  # the training run, when known
    config_path: Path | None = None
    meta_path: Path | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.meta.get("classes") or [])


def from_checkpoint(path: str | Path) -> Trained:
    """``outputs/runs/<date>/checkpoints/epoch03.ckpt``: the config and meta are two levels up."""
    ckpt = Path(path).expanduser().resolve()
    if not ckpt.is_file():
        raise TunelabError(f"no checkpoint at {ckpt}; pass a .ckpt file, a run id (runs:/ID) or models:/NAME/VERSION.")
    folder = ckpt.parent.parent
    config, meta = folder / "resolved_config.yaml", folder / "model_meta.json"
    missing = [p.name for p in (config, meta) if not p.is_file()]
    if missing:
        raise TunelabError(f"{ckpt} has no {' or '.join(missing)} in {folder}: tunelab needs the training config to "
                           "rebuild the model. Use the run's output folder as tunelab-train left it, or pass the "
                           "run id (runs:/ID) so they are read from MLflow.")
    return Trained(OmegaConf.load(config), json.loads(meta.read_text()), ckpt, None, config, meta)


def from_run(client, run_id: str, folder: Path) -> Trained:
    """Download a training run's config, meta and best checkpoint into ``folder``."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
        config = client.download_artifacts(run_id, "config.yaml", str(folder))
        meta = client.download_artifacts(run_id, "model_meta.json", str(folder))
        ckpts = sorted(Path(client.download_artifacts(run_id, "checkpoints", str(folder))).glob("*.ckpt"))
    except (MlflowException, OSError) as err:
        raise TunelabError(f"cannot read training run {run_id} from MLflow ({getattr(err, 'message', err)}); "
                           "is it a tunelab training run in this store (--store / MLFLOW_TRACKING_URI)?") from None
    if not ckpts:
        raise TunelabError(f"run {run_id} logged no checkpoint (callbacks.model_checkpoint was off).")
    return Trained(OmegaConf.load(config), json.loads(Path(meta).read_text()), ckpts[0], run_id, Path(config), Path(meta))


def store_client(store: Path | None = None):
    """The MLflow client that ``runs:/`` and ``models:/`` sources are read from: ``--store``, else
    MLFLOW_TRACKING_URI, else tunelab's default local store."""
    import os

    from mlflow.tracking import MlflowClient

    from tunelab.ui import default_store

    uri = os.environ.get("MLFLOW_TRACKING_URI") if store is None else None
    return MlflowClient(uri or f"sqlite:///{(store or default_store()).expanduser().resolve()}")


def resolve(source: str, client, folder: Path | None = None) -> Trained:
    """A checkpoint path, ``runs:/ID`` (or a bare run id) or ``models:/NAME/VERSION``."""
    folder = folder or Path(tempfile.mkdtemp(prefix="tunelab-"))
    if source.startswith("models:/"):
        parts = source[len("models:/"):].split("/")
        if len(parts) != 2:
            raise TunelabError(f"{source!r}: expected models:/NAME/VERSION, e.g. models:/digits/1")
        from mlflow.exceptions import MlflowException

        try:
            version = client.get_model_version(parts[0], parts[1])
        except MlflowException as err:
            raise TunelabError(f"no registered model {source} in this store ({err.message}).") from None
        return from_run(client, version.run_id, folder)
    run_id = source[len("runs:/"):].split("/")[0] if source.startswith("runs:/") else source
    if RUN_ID.match(run_id):
        return from_run(client, run_id, folder)
    return from_checkpoint(source)


def lightning_state(path: Path, what: str) -> dict:
    """The ``state_dict`` of a Lightning checkpoint, read with ``weights_only=True``: a file that
    holds pickled Python objects beyond tensors is refused (adapters.weights.load_checkpoint)."""
    from tunelab.adapters.weights import load_checkpoint

    checkpoint = load_checkpoint(path, what)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise TunelabError(f"{what}: {path} is not a Lightning checkpoint (no state_dict); pass the .ckpt "
                           "tunelab-train wrote in <run>/checkpoints/, a run id (runs:/ID) or models:/NAME/VERSION.")
    return state


def load_adapter(trained: Trained):
    """The adapter the run trained, with its fine-tuned weights (read with ``weights_only=True``)."""
    from tunelab.build import accepted
    from tunelab.config import build

    cfg, meta = trained.cfg, trained.meta
    adapter = build(cfg.model, "model", num_outputs=int(meta["num_outputs"]), lora=cfg.get("lora"),
                    **accepted(cfg.model, meta.get("model_kwargs") or {}))
    state = lightning_state(trained.checkpoint, "checkpoint")
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    adapter.model.load_state_dict(weights)
    adapter.model.eval()
    adapter.target_stats = (float(state.get("target_mean", 0.0)), float(state.get("target_std", 1.0)))
    return adapter


class Predictor(torch.nn.Module):
    """Logits, or regression predictions in the targets' units: what the training module returns."""

    def __init__(self, adapter, task: str):
        super().__init__()
        self.model, self.task = adapter.model, task
        mean, std = getattr(adapter, "target_stats", (0.0, 1.0))
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x):
        out = self.model(x)
        return out.squeeze(-1) * self.std + self.mean if self.task == "regression" else out


def init_from(adapter, source: str, uri: str) -> dict[str, str]:
    """Start a new run from a trained model's weights (re-training on new data).

    Every tensor whose name and shape match is copied; a head with another number of classes
    is skipped and stays new. Returns the lineage tags for the new run.
    """
    import shutil

    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="tunelab-init-"))
    try:
        trained = resolve(source, MlflowClient(uri), folder)
        state = lightning_state(trained.checkpoint, f"init_from={source}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    own = adapter.model.state_dict()
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    usable = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise TunelabError(f"init_from={source}: none of its weights fit this model ({adapter.description}); "
                           "re-training needs the same model config.")
    adapter.model.load_state_dict(usable, strict=False)
    skipped = sorted(set(own) - set(usable))
    return {"tunelab.init_from": source, "tunelab.init_from_run": trained.run_id or "",
            "tunelab.init_from_skipped": ", ".join(skipped)[:4000] or "none"}
