"""A trained model back from disk: its config, its metadata and its weights, wherever they are.

A training run stores its resolved config and model meta (task, classes, input settings) inside
every checkpoint (``checkpoint["tunelab"]["config"]`` / ``["meta"]``, plain containers), so a
``.ckpt`` copied alone still says how to rebuild its model. Checkpoints written before that have
them beside: ``resolved_config.yaml`` and ``model_meta.json`` in the run's output folder, and the
MLflow artifacts ``config.yaml`` / ``model_meta.json``. Every after-training command (eval,
export, monitor, the pyfunc, init_from) starts here.

A stored config is untrusted input: whoever can write it (a shared store, a copied folder) would
otherwise choose what gets built. Each one is held to the rules of a config typed on the command
line before anything is built from it (:func:`judged`).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from tunelab.adapters.weights import load_checkpoint
from tunelab.config import build, check_targets
from tunelab.config.settings import accepted
from tunelab.errors import TunelabError
from tunelab.tracking import tag_names
from tunelab.tracking.store import default_store

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
EMA_WEIGHTS = "ema_state_dict"  # a checkpoint's EMA of the weights (engine/ema.py), state_dict's keys


@dataclass
class Trained:
    cfg: DictConfig
    meta: dict
    checkpoint: Path
    run_id: str | None = None  # the training run, when known
    config_path: Path | None = None  # the files the config and meta came from; None: the checkpoint
    meta_path: Path | None = None
    state: dict | None = field(default=None, repr=False)  # the checkpoint's weights (model_state), read once

    @property
    def classes(self) -> list[str]:
        return list(self.meta.get("classes") or [])


# -- a stored config is untrusted input ---------------------------------------------------------------


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted path, key, value) for every entry of a tree of plain containers."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, (list, tuple)) else ()
    for key, value in items:
        here = f"{path}[{key}]" if isinstance(node, (list, tuple)) else f"{path}.{key}" if path else str(key)
        yield here, key, value
        yield from _walk(value, here)


def judged(tree: Any, where: str) -> DictConfig:
    """``tree`` (a stored config or model meta, plain containers) as a config, once it passes the
    rules of a config typed on the command line: the whole tree under the ``_target_`` allow-list,
    no ``trust_remote_code`` (it runs Python shipped with a model), and no interpolation at all.
    tunelab stores configs resolved, so ``${`` means someone wrote it there, and it would resolve
    in the loader's process: ``${oc.env:...}`` reads its environment, and Hydra resolves a node
    again when it builds it, so a target would be chosen after the allow-list judged it.
    ``where`` (the file, or the run) is named in the one-line refusal."""
    from omegaconf.errors import OmegaConfBaseException


    if not isinstance(tree, dict):
        raise TunelabError(f"refused {where}: it holds a {type(tree).__name__}, not the mapping tunelab writes.")
    for path, key, value in _walk(tree):
        if isinstance(value, str) and "${" in value:
            raise TunelabError(f"refused {where}: {path}={value[:80]!r} is an interpolation; tunelab stores configs "
                               "resolved, so no tunelab run wrote it, and resolving it here would read this "
                               "process's environment or choose a target after the allow-list judged it.")
        if key == "trust_remote_code" and value not in (False, None):
            raise TunelabError(f"refused {where}: {path}={value!r} would run Python files shipped with a model; "
                               "tunelab never enables trust_remote_code.")
    try:
        node = OmegaConf.create(tree)
    except (OmegaConfBaseException, ValueError) as err:  # a tensor or an object where a value belongs
        raise TunelabError(f"refused {where}: not a config tunelab wrote ({str(err).splitlines()[0]}).") from None
    try:
        check_targets(node)
    except TunelabError as err:
        raise TunelabError(f"refused {where}: {err}") from None
    return node


def _judged_meta(meta: Any, where: str) -> dict:
    """Model meta is data (class names may hold any text), but its ``model_kwargs`` are the
    model target's arguments, built with it: those are judged like a config."""
    if not isinstance(meta, dict):
        raise TunelabError(f"refused {where}: it holds a {type(meta).__name__}, not the mapping tunelab writes.")
    judged({"model_kwargs": meta.get("model_kwargs") or {}}, where)
    return meta


def _read_yaml(path: Path, where: str) -> Any:
    """The YAML's plain values, interpolations unresolved (judged() refuses them)."""
    try:
        return OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:  # noqa: BLE001 - YAML errors (a !!python tag...) and OmegaConf's, in one line
        raise TunelabError(f"refused {where}: cannot read it as YAML ({' '.join(str(err).split())[:200]}).") from None


def _read_json(path: Path, where: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise TunelabError(f"refused {where}: cannot read it as JSON ({err}).") from None


# -- a checkpoint, and the record it carries ----------------------------------------------------------


def read_checkpoint(path: Path, what: str = "checkpoint") -> dict:
    """A Lightning checkpoint, read with ``weights_only=True``: a file that holds pickled Python
    objects beyond tensors is refused (adapters.weights.load_checkpoint)."""
    checkpoint = load_checkpoint(path, what)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise TunelabError(f"{what}: {path} is not a Lightning checkpoint (no state_dict); pass the .ckpt "
                           "tunelab-train wrote in <run>/checkpoints/, a run id (runs:/ID) or models:/NAME/VERSION.")
    return checkpoint


def lightning_state(path: Path, what: str) -> dict:
    """The ``state_dict`` of a Lightning checkpoint (see :func:`read_checkpoint`)."""
    return read_checkpoint(path, what)["state_dict"]


def model_state(checkpoint: dict) -> dict:
    """The weights a trained model is read with, by every reader (eval, export, the registry,
    serving, ``init_from``): the ``state_dict``, with the EMA of the weights in place of the raw
    ones when the run kept one (engine/ema.py). Only keys the ``state_dict`` has are replaced."""
    state, ema = checkpoint["state_dict"], checkpoint.get(EMA_WEIGHTS)
    if not isinstance(ema, dict):
        return state
    return {**state, **{k: v for k, v in ema.items() if k in state and isinstance(v, torch.Tensor)}}


def _stored_inside(checkpoint: dict) -> tuple[Any, Any] | None:
    """The config and meta a checkpoint carries (module.on_save_checkpoint), or None when it was
    written before checkpoints carried them."""
    record = checkpoint.get("tunelab")
    if isinstance(record, dict) and "config" in record and "meta" in record:
        return record["config"], record["meta"]
    return None


def _trained(ckpt: Path, beside, run_id: str | None = None, label=str) -> Trained:
    """The model in ``ckpt``: its own config and meta, else (older checkpoints) the files
    ``beside()`` finds, ``(config, meta)``; all judged before use, named by ``label(path)``."""
    checkpoint = read_checkpoint(ckpt, "checkpoint")
    state, inside = model_state(checkpoint), _stored_inside(checkpoint)
    if inside is not None:
        return Trained(judged(inside[0], f"the config stored in {label(ckpt)}"),
                       _judged_meta(inside[1], f"the model meta stored in {label(ckpt)}"), ckpt, run_id, state=state)
    config, meta = beside()
    cfg = judged(_read_yaml(config, label(config)), label(config))
    return Trained(cfg, _judged_meta(_read_json(meta, label(meta)), label(meta)), ckpt, run_id, config, meta, state)


def from_checkpoint(path: str | Path) -> Trained:
    """``outputs/runs/<date>/checkpoints/epoch03.ckpt``: the config and meta are inside it, or
    (older checkpoints) two levels up."""
    ckpt = Path(path).expanduser().resolve()
    if not ckpt.is_file():
        raise TunelabError(f"no checkpoint at {ckpt}; pass a .ckpt file, a run id (runs:/ID) or models:/NAME/VERSION.")

    def beside() -> tuple[Path, Path]:
        folder = ckpt.parent.parent
        config, meta = folder / "resolved_config.yaml", folder / "model_meta.json"
        missing = [p.name for p in (config, meta) if not p.is_file()]
        if missing:
            raise TunelabError(f"{ckpt} holds no training config (written before tunelab kept it inside checkpoints) "
                               f"and there is no {' or '.join(missing)} in {folder}: tunelab needs the training "
                               "config to rebuild the model. Use the run's output folder as tunelab-train left it, "
                               "or pass the run id (runs:/ID) so they are read from MLflow.")
        return config, meta

    return _trained(ckpt, beside)


def from_run(client, run_id: str, folder: Path) -> Trained:
    """Download a training run's best checkpoint into ``folder`` (and, for runs whose checkpoints
    do not carry their config, its ``config.yaml`` and ``model_meta.json``)."""
    from mlflow.exceptions import MlflowException

    def download(path: str) -> Path:
        try:
            return Path(client.download_artifacts(run_id, path, str(folder)))
        except (MlflowException, OSError) as err:
            raise TunelabError(f"cannot read training run {run_id} from MLflow ({getattr(err, 'message', err)}); "
                               "is it a tunelab training run in this store (--store / MLFLOW_TRACKING_URI)?") from None

    try:
        client.get_run(run_id)
    except MlflowException as err:
        raise TunelabError(f"cannot read training run {run_id} from MLflow ({err.message}); is it a tunelab "
                           "training run in this store (--store / MLFLOW_TRACKING_URI)?") from None
    ckpts = sorted(download("checkpoints").glob("*.ckpt"))
    if not ckpts:
        raise TunelabError(f"run {run_id} logged no checkpoint (callbacks.model_checkpoint was off).")
    return _trained(ckpts[0], lambda: (download("config.yaml"), download("model_meta.json")), run_id,
                    lambda path: f"{path.name} of run {run_id}")


def from_artifacts(artifacts: dict[str, str]) -> Trained:
    """A registered pyfunc model's files (``context.artifacts``): its checkpoint, and for models
    registered before checkpoints carried their config, ``config`` and ``meta``."""
    def beside() -> tuple[Path, Path]:
        if "config" not in artifacts or "meta" not in artifacts:
            raise TunelabError(f"the registered model's checkpoint {artifacts['checkpoint']} holds no training "
                               "config and the model has no config artifact: register it again with tunelab.")
        return Path(artifacts["config"]), Path(artifacts["meta"])

    return _trained(Path(artifacts["checkpoint"]), beside)


def store_client(store: Path | None = None):
    """The MLflow client that ``runs:/`` and ``models:/`` sources are read from: ``--store``, else
    MLFLOW_TRACKING_URI, else tunelab's default local store."""
    import os

    from mlflow.tracking import MlflowClient


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


def load_adapter(trained: Trained):
    """The adapter the run trained, with its fine-tuned weights (read with ``weights_only=True``)."""
    cfg, meta = trained.cfg, trained.meta
    adapter = build(cfg.model, "model", num_outputs=int(meta["num_outputs"]), lora=cfg.get("lora"),
                    **accepted(cfg.model, meta.get("model_kwargs") or {}))
    state = trained.state if trained.state is not None else model_state(read_checkpoint(trained.checkpoint))
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
        trained = resolve(source, MlflowClient(uri), folder)  # its stored config judged, though unused
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    own = adapter.model.state_dict()
    weights = {k[len("model."):]: v for k, v in trained.state.items() if k.startswith("model.")}
    usable = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise TunelabError(f"init_from={source}: none of its weights fit this model ({adapter.description}); "
                           "re-training needs the same model config.")
    adapter.model.load_state_dict(usable, strict=False)
    skipped = sorted(set(own) - set(usable))
    return {tag_names.INIT_FROM: source, tag_names.INIT_FROM_RUN: trained.run_id or "",
            tag_names.INIT_FROM_SKIPPED: ", ".join(skipped)[:4000] or "none"}
