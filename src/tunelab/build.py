"""From a composed config to the parts of a run: data, adapter, stages, LightningModule."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from tunelab.adapters import Adapter
from tunelab.config import build, check_config
from tunelab.data.datamodule import ImageDataModule
from tunelab.module import FineTuneModule
from tunelab.stage_report import stage_table
from tunelab.strategies import Stage, check_stages


@dataclass
class Parts:
    datamodule: ImageDataModule
    adapter: Adapter
    stages: list[Stage]
    module: FineTuneModule
    base_lr: float

    def stage_table(self) -> str:
        sizes = {n: p.numel() for n, p in self.adapter.model.named_parameters()}
        return stage_table(self.stages, self.adapter.groups, sizes, self.base_lr, self.module.layer_scale)


def build_regularizer(cfg: DictConfig, adapter: Adapter):
    node = cfg.get("regularizer")
    if not node or "_target_" not in node:  # regularizer=none
        return None
    head = set(adapter.groups[-1].param_names)
    return build(node, "regularizer")(adapter.model, head)


def build_parts(cfg: DictConfig) -> Parts:
    """Read the data first (it decides ``num_classes``), then the model, then the schedule."""
    check_config(cfg)
    datamodule = build(cfg.data, "data").scan()
    adapter = build(cfg.model, "model", num_classes=datamodule.num_classes, image_size=datamodule.image_size,
                    lora=cfg.get("lora"))
    datamodule.set_model_data_config(adapter.data_config)
    stages = build(cfg.strategy, "strategy")(adapter.group_names)
    check_stages(stages, adapter.group_names, int(cfg.trainer.max_epochs),
                 {g.name: list(g.param_names) for g in adapter.groups})
    module = FineTuneModule(
        adapter,
        num_classes=datamodule.num_classes,
        optimizer=build(cfg.optimizer, "optimizer"),
        stages=stages,
        scheduler=build(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None,
        regularizer=build_regularizer(cfg, adapter),
        **cfg.get("module", {}),
    )
    return Parts(datamodule, adapter, stages, module, float(cfg.optimizer.lr))
