"""From a composed config to the parts of a run: data, adapter, stages, LightningModule."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from omegaconf import DictConfig, open_dict

from tunelab.adapters import Adapter
from tunelab.config import build
from tunelab.config.settings import accepted, extension_points, signature_of
from tunelab.data.datamodule import TaskDataModule
from tunelab.data.modalities import modality
from tunelab.engine.budget import check_train_fraction, fit_schedule, full_epochs
from tunelab.engine.feature_cache import CachePlan, plan_cache
from tunelab.engine.module import FineTuneModule
from tunelab.engine.perf import perf_settings
from tunelab.engine.retention import snapshot
from tunelab.engine.stage_report import stage_table
from tunelab.engine.strategies import Stage, check_stages, keep_frozen
from tunelab.engine.trained import init_from
from tunelab.engine.validation import check_config
from tunelab.errors import TunelabError
from tunelab.tracking.store import tracking_uri


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
        kind = {"classification": f"{dm.num_classes} classes", "multilabel": f"{dm.num_classes} labels (multi-label)",
                "regression": "regression"}[dm.task]
        return (f"model: {self.adapter.description}\ndata: {dm.name}, {kind}, splits {dm.split_sizes()}\n"
                f"stages (strategy {strategy}):\n{self.stage_table()}")


def batchnorm_mode(cfg: DictConfig) -> str:
    """module.batchnorm, with ``auto`` resolved: ``eval`` keeps pretrained running statistics
    (the Keras recipe), but a randomly initialised model has none worth keeping (mean 0, var 1
    would leave its activations unnormalised), so it normalises with batch statistics."""
    mode = str((cfg.get("module") or {}).get("batchnorm", "auto"))
    if mode != "auto":
        return mode
    random_init = not cfg.model.get("pretrained", True) and not cfg.model.get("checkpoint") and not cfg.get("init_from")
    return "train" if random_init else "eval"


def build_point(cfg: DictConfig, name: str, run: dict):
    """The extension point ``name`` of FineTuneModule built from the top-level node of that name
    (None when absent or a ``none`` choice). Parameters named like an entry of ``run`` (the model,
    its head's parameter names, the task...) are bound from it; a partial that still needs
    arguments (an optimizer's parameters, a loss's outputs) stays a factory."""
    node = cfg.get(name)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    built = build(node, name)
    if not isinstance(built, functools.partial):
        return built
    params, _ = signature_of(built.func)
    given = {k: v for k, v in run.items() if k in params and k not in built.keywords}
    bound = functools.partial(built.func, *built.args, **built.keywords, **given)
    needed = [n for n, p in params.items() if p.default is p.empty and n not in bound.keywords and n != "self"]
    # a class (a loss module) is built now; a function stays the factory its caller completes
    return bound() if not needed and (given or isinstance(built.func, type)) else bound


def build_module(cfg: DictConfig, adapter: Adapter, datamodule: TaskDataModule, stages: list[Stage], perf: dict):
    """FineTuneModule with every extension point its signature declares built from the config."""
    run = {"model": adapter.model, "head_names": set(adapter.groups[-1].param_names),
           "num_outputs": datamodule.num_outputs, "task": datamodule.task,
           "class_counts": datamodule.class_counts(), "num_samples": datamodule.split_sizes()["train"],
           "modality": adapter.modality, "seed": int(cfg.seed)}
    points = {name: build_point(cfg, name, run) for name in extension_points(FineTuneModule)}
    module = FineTuneModule(adapter, datamodule.num_outputs, stages, datamodule.task, datamodule.target_stats(), perf,
                            datamodule.threshold,
                            **{k: v for k, v in points.items() if v is not None},
                            **{**cfg.get("module", {}), "batchnorm": batchnorm_mode(cfg)})
    return module


def build_parts(cfg: DictConfig, datamodule: TaskDataModule | None = None) -> Parts:
    """Read the data first (it decides ``num_classes``), then the model, then the schedule.
    ``datamodule`` replaces ``cfg.data`` (the benchmark feeds synthetic batches)."""
    check_config(cfg)
    datamodule = datamodule or build(cfg.data, "data").scan()
    check_train_fraction(cfg.trainer.get("limit_train_batches"), datamodule)
    adapter = build(cfg.model, "model", num_outputs=datamodule.num_outputs, lora=cfg.get("lora"),
                    **accepted(cfg.model, datamodule.model_kwargs))
    if adapter.modality != datamodule.modality:
        raise TunelabError(
            f"data={datamodule.name} holds {datamodule.modality} but the model takes {adapter.modality} "
            f"({adapter.description}); pick a matching pair, e.g. {modality(datamodule.modality).example_model}."
        )
    lineage = {}
    if cfg.get("init_from"):  # re-training: start from a trained model instead of the pretrained one

        lineage = init_from(adapter, str(cfg.init_from), tracking_uri(cfg))
    datamodule.set_model_data_config(adapter.data_config)
    perf = perf_settings(**(cfg.get("perf") or {}))
    stages = keep_frozen(build(cfg.strategy, "strategy")(adapter.group_names), adapter.frozen_groups)
    stages, notes = fit_schedule(cfg, stages, datamodule)
    check_stages(stages, adapter.group_names, int(cfg.trainer.max_epochs),
                 {g.name: list(g.param_names) for g in adapter.groups})
    module = build_module(cfg, adapter, datamodule, stages, perf)
    # the loss (and its class weights) and the batch mixing, printed and logged with the stage table
    notes = (*notes, *(part.describe() for part in (module.loss_fn, module.mixer) if hasattr(part, "describe")))
    plan = plan_cache(perf.get("cache_features", "auto"), stages, adapter, datamodule, int(cfg.trainer.max_epochs),
                      module.batchnorm, full_epochs=full_epochs(cfg.trainer.get("limit_train_batches")),
                      mixing="mixup/cutmix mixes the input images" if module.mixer else None)
    pretrained = None
    if (cfg.get("retention") or {}).get("enabled"):

        pretrained = snapshot(adapter.model)
    return Parts(datamodule, adapter, stages, module, float(cfg.optimizer.lr), pretrained, lineage, plan, notes)


def plan_parts(cfg: DictConfig) -> str:
    """build_parts without the retention copy: the plan --check prints."""
    with open_dict(cfg):
        if cfg.get("retention"):
            cfg.retention.enabled = False
    parts = build_parts(cfg)
    return parts.describe(cfg.strategy._target_.rsplit(".", 1)[-1])
