"""One training job inside the MLflow run its caller opened: fit, test the best checkpoint, the
after-training checks (shifted test splits, retention) and the description that rebuilds the model.
``tunelab-train`` (tunelab/cli/train.py) opens the run, assembles the callbacks, registers and reports."""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tunelab.adapters.weights import checkpoint_error
from tunelab.config.redaction import redact, redacted_yaml
from tunelab.data.preprocess import settings_from
from tunelab.data.sampling import MidEpochResume
from tunelab.engine.evaluation import shifted_splits, to_device
from tunelab.engine.feature_cache import FeatureCache
from tunelab.engine.retention import measure
from tunelab.engine.stage_callback import StageCallback
from tunelab.errors import Preempted

log = logging.getLogger("tunelab")


def core_callbacks(parts=None) -> list:
    """The callbacks that are how tunelab works, not options: stages, exact resumes, and the
    cached-feature fast path when the run plans one."""
    cache = parts is not None and parts.cache_plan is not None and parts.cache_plan.epochs is not None
    return [StageCallback(), MidEpochResume(), *([FeatureCache(parts.cache_plan, parts.adapter)] if cache else [])]


def model_meta(parts) -> dict:
    """What rebuilds the model and feeds it later (eval, export, serving), with the config."""
    dm, adapter = parts.datamodule, parts.adapter
    meta = {"task": dm.task, "modality": adapter.modality, "num_outputs": dm.num_outputs,
            "classes": dm.classes if dm.task != "regression" else [], "model_kwargs": dm.model_kwargs,
            "preprocess": settings_from(dm)}
    if dm.task == "multilabel":  # classes are the label names; predict and serving mark those above it
        meta["threshold"] = dm.threshold
    return meta


def store_description(cfg: DictConfig, meta: str, module, rank: int) -> None:
    """The config and meta that rebuild the model, without values read from the environment:
    inside every checkpoint the module saves, so a .ckpt copied alone still describes its model,
    and on rank 0 as files beside the checkpoints (what checkpoints from before that rely on)."""
    config, meta = redacted_yaml(cfg), redact(meta)
    # parsed back from the very text of resolved_config.yaml: the checkpoint holds the same config,
    # as plain containers (torch.load(weights_only=True) reads those, never OmegaConf objects)
    module.stored_run = {"config": OmegaConf.to_container(OmegaConf.create(config)), "meta": json.loads(meta)}
    if rank != 0:
        return
    folder = Path(str(cfg.paths.output_dir))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "resolved_config.yaml").write_text(config)
    (folder / "model_meta.json").write_text(meta)


def watched(guard, ranks):
    """SIGTERM turns into a clean stop, and a dead sibling rank is named, while Lightning runs."""
    stack = contextlib.ExitStack()
    stack.enter_context(guard.lightning())
    if ranks is not None:
        stack.enter_context(ranks.blame())
    return stack


def fit(trainer, parts, cfg: DictConfig, guard, ranks, preemption) -> None:
    """trainer.fit, with pre-emption, Ctrl+C and a checkpoint holding Python objects told apart."""
    try:
        with watched(guard, ranks):
            trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    except pickle.UnpicklingError as err:  # ckpt_path holds Python objects: refused, never run

        raise checkpoint_error(cfg.ckpt_path, "ckpt_path", err) from None
    except SystemExit:
        if trainer.received_sigterm:  # Lightning stopped at a batch boundary; the checkpoint is saved
            raise Preempted(preemption.saved) from None
        if trainer.interrupted:  # Lightning turns Ctrl+C into sys.exit(1) after shutting down
            raise KeyboardInterrupt("training interrupted") from None
        raise
    if trainer.interrupted:
        raise KeyboardInterrupt("training interrupted")


def best_and_last_metrics(trainer, callbacks: list) -> tuple[str, dict[str, float]]:
    """The best checkpoint's path ('' without one) and the last epoch's metrics, with the
    objective replaced by the best checkpoint's score: the weights that will be tested. Only a
    configured ModelCheckpoint counts (``callbacks``), not one Lightning adds by default."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if checkpoint and checkpoint.best_model_score is not None:
        metrics[checkpoint.monitor] = float(checkpoint.best_model_score)
    return (checkpoint.best_model_path if checkpoint else ""), metrics


def test(trainer, parts, cfg: DictConfig, best: str, guard, ranks) -> dict[str, float]:
    """trainer.test on the best checkpoint (the last weights without one)."""
    try:
        with watched(guard, ranks):
            results = trainer.test(parts.module, datamodule=parts.datamodule, ckpt_path=best or None,
                                   weights_only=True, verbose=False)
    except SystemExit:
        if trainer.received_sigterm:  # training is complete: resuming from last.ckpt only tests again
            raise Preempted(_last_checkpoint(cfg)) from None
        raise
    return results[0] if results else {}


def after_training(cfg: DictConfig, parts, metrics: dict[str, float]) -> dict[str, float]:
    """Rank 0's checks of the tested model: shifted copies of the test split (what a shift costs)
    and retention (what fine-tuning cost the pretrained model)."""
    dm, found = parts.datamodule, {}
    if dm.ood_names():

        log.info("testing on shifted copies of the test split: %s", ", ".join(dm.ood_names()))
        found.update(shifted_splits(parts.module, dm, metrics, _batch_limit(cfg.trainer.get("limit_test_batches"))))
    if parts.pretrained is not None:
        log.info("measuring retention: weight drift and CKA against the pretrained model (retention.enabled)")
        found.update(_retention(cfg, parts))
    return found


def log_stage_starts(trainer, module) -> None:
    """The ``stage`` metric at every stage's first step, not only at epoch ends: a stage shorter
    than an epoch (a compressed smoke schedule, step-based stages) shows up in its history too."""
    names, previous = [s.name for s in module.stages], None
    for step, name in module.stage_log:  # set_stage runs again at setup and on resume: log changes only
        for logger in trainer.loggers if name != previous else ():  # MLflow and any extra (logger=csv...)
            logger.log_metrics({"stage": float(names.index(name))}, step=step)
        previous = name


def parameter_counts(model) -> dict[str, float]:
    """The last stage's trainable set (what a run tunes in the end), for comparing strategies."""
    weights = list(model.parameters())
    return {"params/trainable": float(sum(p.numel() for p in weights if p.requires_grad)),
            "params/total": float(sum(p.numel() for p in weights))}


def _last_checkpoint(cfg: DictConfig) -> str | None:
    last = Path(str(cfg.paths.output_dir)) / "checkpoints" / "last.ckpt"
    return str(last) if last.is_file() else None


def _retention(cfg: DictConfig, parts) -> dict[str, float]:
    inputs = parts.datamodule.first_inputs("test", int(cfg.retention.samples))  # the reference batch
    device = next(parts.module.parameters()).device
    return measure(parts.pretrained, parts.module.model, parts.adapter.groups, to_device(inputs, device),
                   parts.adapter.pretrained_head, parts.adapter.data_config, parts.adapter.pretrained_task,
                   cfg.retention.get("natural_images"))


def _batch_limit(limit) -> int | None:
    """Lightning's limit_*_batches (an int, or a fraction where 1.0 = all) as a batch count."""
    return int(limit) if isinstance(limit, int) and not isinstance(limit, bool) else None
