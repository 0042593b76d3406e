"""From a composed config to the parts of a run: data, adapter, stages, LightningModule."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from omegaconf import DictConfig, open_dict

from tunelab.adapters import Adapter
from tunelab.config import build, check_config, check_targets
from tunelab.data.datamodule import TaskDataModule
from tunelab.engine.feature_cache import CachePlan, plan_cache
from tunelab.engine.module import FineTuneModule
from tunelab.engine.stage_report import stage_table
from tunelab.engine.strategies import Stage, check_stages, compress, keep_frozen
from tunelab.errors import TunelabError


@dataclass
class Parts:
    datamodule: TaskDataModule
    adapter: Adapter
    stages: list[Stage]
    module: FineTuneModule
    base_lr: float
    pretrained: object = None  # a frozen copy of the model before training (retention.enabled)
    lineage: dict = None  # tags naming the model this run started from (init_from)
    cache_plan: CachePlan = None  # which epochs train the head on cached backbone features
    notes: tuple[str, ...] = ()  # what tunelab changed in the plan (a compressed smoke schedule)

    def stage_table(self) -> str:
        sizes = {n: p.numel() for n, p in self.adapter.model.named_parameters()}
        table = stage_table(self.stages, self.adapter.groups, sizes, self.base_lr, self.module.layer_scale)
        extra = [self.cache_plan.describe()] if self.cache_plan else []
        return "\n".join([table, *extra, *self.notes])

    def describe(self, strategy: str) -> str:
        """What the run will train, on what, when: printed at its start and by --check."""
        dm = self.datamodule
        kind = f"{dm.num_classes} classes" if dm.task == "classification" else "regression"
        return (f"model: {self.adapter.description}\ndata: {dm.name}, {kind}, splits {dm.split_sizes()}\n"
                f"stages (strategy {strategy}):\n{self.stage_table()}")


EXAMPLES = {"image": "model=efficientnet_lite0", "text": "model=minilm", "audio": "model=wav2vec2_tiny"}


def batchnorm_mode(cfg: DictConfig) -> str:
    """module.batchnorm, with ``auto`` resolved: ``eval`` keeps pretrained running statistics
    (the Keras recipe), but a randomly initialised model has none worth keeping (mean 0, var 1
    would leave its activations unnormalised), so it normalises with batch statistics."""
    mode = str((cfg.get("module") or {}).get("batchnorm", "auto"))
    if mode != "auto":
        return mode
    random_init = not cfg.model.get("pretrained", True) and not cfg.model.get("checkpoint") and not cfg.get("init_from")
    return "train" if random_init else "eval"


def accepted(node: DictConfig, kwargs: dict) -> dict:
    """The ``kwargs`` that ``node``'s target takes: an image size means nothing to a text model,
    and the modality check below then gives the real error."""
    from hydra.utils import get_method

    check_targets(node, "model")
    try:
        params = inspect.signature(get_method(node._target_)).parameters
    except Exception:  # noqa: BLE001 - an unknown target: build() reports it properly
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def build_regularizer(cfg: DictConfig, adapter: Adapter):
    node = cfg.get("regularizer")
    if not node or "_target_" not in node:  # regularizer=none
        return None
    head = set(adapter.groups[-1].param_names)
    return build(node, "regularizer")(adapter.model, head)


def _full_epochs(limit) -> bool:
    return limit is None or (isinstance(limit, float) and limit == 1.0)  # Lightning: int 1 = one batch


def _check_train_fraction(limit, datamodule) -> None:
    """A fraction of the training batches that rounds to none would stop Lightning mid-fit."""
    if not isinstance(limit, float) or not 0 < limit < 1 or not hasattr(datamodule, "split_sizes"):
        return
    batches = train_batches(datamodule)
    if int(batches * limit) == 0:
        raise TunelabError(f"trainer.limit_train_batches={limit} of {batches} training batches is none; "
                           f"use at least {1 / batches:.3g} or a number of batches (e.g. 1).")


def build_parts(cfg: DictConfig, datamodule: TaskDataModule | None = None) -> Parts:
    """Read the data first (it decides ``num_classes``), then the model, then the schedule.
    ``datamodule`` replaces ``cfg.data`` (the benchmark feeds synthetic batches)."""
    check_config(cfg)
    datamodule = datamodule or build(cfg.data, "data").scan()
    _check_train_fraction(cfg.trainer.get("limit_train_batches"), datamodule)
    adapter = build(cfg.model, "model", num_outputs=datamodule.num_outputs, lora=cfg.get("lora"),
                    **accepted(cfg.model, datamodule.model_kwargs))
    if adapter.modality != datamodule.modality:
        raise TunelabError(
            f"data={datamodule.name} holds {datamodule.modality} but the model takes {adapter.modality} "
            f"({adapter.description}); pick a matching pair, e.g. {EXAMPLES[datamodule.modality]}."
        )
    lineage = {}
    if cfg.get("init_from"):  # re-training: start from a trained model instead of the pretrained one
        from tunelab.engine.trained import init_from
        from tunelab.tracking.store import tracking_uri

        lineage = init_from(adapter, str(cfg.init_from), tracking_uri(cfg))
    datamodule.set_model_data_config(adapter.data_config)
    perf = dict(cfg.get("perf") or {})
    stages = keep_frozen(build(cfg.strategy, "strategy")(adapter.group_names), adapter.frozen_groups)
    stages, notes = _fit_schedule(cfg, stages, datamodule)
    check_stages(stages, adapter.group_names, int(cfg.trainer.max_epochs),
                 {g.name: list(g.param_names) for g in adapter.groups})
    module = FineTuneModule(
        adapter,
        num_outputs=datamodule.num_outputs,
        task=datamodule.task,
        target_stats=datamodule.target_stats(),
        optimizer=build(cfg.optimizer, "optimizer"),
        stages=stages,
        scheduler=build(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None,
        regularizer=build_regularizer(cfg, adapter),
        perf=perf,
        **{**cfg.get("module", {}), "batchnorm": batchnorm_mode(cfg)},
    )
    plan = plan_cache(perf.get("cache_features", "auto"), stages, adapter, datamodule, int(cfg.trainer.max_epochs),
                      module.batchnorm, full_epochs=_full_epochs(cfg.trainer.get("limit_train_batches")))
    pretrained = None
    if (cfg.get("retention") or {}).get("enabled"):
        from tunelab.engine.retention import snapshot

        pretrained = snapshot(adapter.model)
    return Parts(datamodule, adapter, stages, module, float(cfg.optimizer.lr), pretrained, lineage, plan, notes)


def train_batches(datamodule) -> int:
    """Batches in one full pass over the training split (the last one may be short)."""
    return -(-datamodule.split_sizes()["train"] // datamodule.batch_size)


def steps_per_epoch(cfg: DictConfig, datamodule) -> int:
    """Optimizer steps in one training epoch, as Lightning will count them."""
    batches = train_batches(datamodule)
    limit = cfg.trainer.get("limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool):
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = max(1, int(batches * limit))
    return max(1, -(-batches // int(cfg.trainer.get("accumulate_grad_batches") or 1)))


def _fit_schedule(cfg: DictConfig, stages: list[Stage], datamodule) -> tuple[list[Stage], tuple[str, ...]]:
    """``compress_stages`` (debug=smoke): a schedule longer than the run is squeezed to one
    optimizer step per stage, and trainer.max_epochs raised as far as that needs."""
    if not cfg.get("compress_stages"):
        return stages, ()
    epochs = int(cfg.trainer.max_epochs)
    squeezed, needed = compress(stages, epochs, steps_per_epoch(cfg, datamodule), "compressed by debug=smoke")
    if squeezed is stages:
        return stages, ()
    with open_dict(cfg):
        cfg.trainer.max_epochs = needed
    was = stages[-1]
    return squeezed, (f"debug=smoke compressed the schedule (its last stage starts at {was.unit} {was.start}, "
                      f"beyond trainer.max_epochs={epochs}): each stage now starts one optimizer step after the "
                      f"one before, over {needed} epoch(s).",)


def plan_parts(cfg: DictConfig) -> str:
    """build_parts without the retention copy: the plan --check prints."""
    with open_dict(cfg):
        if cfg.get("retention"):
            cfg.retention.enabled = False
    parts = build_parts(cfg)
    return parts.describe(cfg.strategy._target_.rsplit(".", 1)[-1])
