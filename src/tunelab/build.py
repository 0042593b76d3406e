"""From a composed config to the parts of a run: data, adapter, stages, LightningModule."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from tunelab.adapters import Adapter
from tunelab.config import build, check_config
from tunelab.data.datamodule import ImageDataModule
from tunelab.module import FineTuneModule
from tunelab.strategies import Stage, check_stages, stage_table


@dataclass
class Parts:
    datamodule: ImageDataModule
    adapter: Adapter
    stages: list[Stage]
    module: FineTuneModule

    def stage_table(self) -> str:
        return stage_table(self.stages, self.adapter.group_names, self.module.params_per_group())


def build_parts(cfg: DictConfig) -> Parts:
    """Read the data first (it decides ``num_classes``), then the model, then the schedule."""
    check_config(cfg)
    datamodule = build(cfg.data, "data").scan()
    adapter = build(cfg.model, "model", num_classes=datamodule.num_classes, image_size=datamodule.image_size)
    datamodule.set_model_data_config(adapter.data_config)
    stages = build(cfg.strategy, "strategy")(adapter.group_names)
    check_stages(stages, adapter.group_names, int(cfg.trainer.max_epochs))
    module = FineTuneModule(
        adapter,
        num_classes=datamodule.num_classes,
        optimizer=build(cfg.optimizer, "optimizer"),
        stages=stages,
        scheduler=build(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None,
        **cfg.get("module", {}),
    )
    return Parts(datamodule, adapter, stages, module)
