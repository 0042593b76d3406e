"""Every YAML that ships composes, and what it describes instantiates (with tiny inputs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import get_object
from omegaconf import OmegaConf

from tunelab.config import build, conf_dir
from tunelab.config.settings import accepted
from tunelab.engine.build import build_parts, build_point
from tunelab.data.modalities import MODALITIES
from tunelab.errors import TunelabError
from conftest import REPO, model_inputs, path_table, skip_without_fashion, write_audio_folder, write_image_folder, write_text_csv

CONF = conf_dir()
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "experiment"))
CHOICES = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
EXPERIMENTS = sorted(f.stem for f in (REPO / "experiments").glob("*.yaml"))


def test_every_group_has_choices_and_experiments_are_linked():
    assert {"model", "data", "strategy", "optimizer", "scheduler", "trainer", "logger",
            "callbacks", "paths", "debug"} <= set(GROUPS)
    assert (CONF / "experiment").resolve() == (REPO / "experiments").resolve()
    assert EXPERIMENTS, "experiments/ must hold at least one experiment"


def _instantiate_group(cfg, group: str, tmp_path: Path, choice: str = ""):
    node = cfg.get(group)  # None for @package _global_ groups (debug)
    if group == "model":
        adapter = build(node, "model", num_outputs=3, **accepted(node, {"image_size": 32}))
        out = adapter.model(model_inputs(adapter))
        assert out.shape == (2, 3)
        assert adapter.groups[-1].name == "head"
        assert adapter.modality in MODALITIES  # what data, export and serving look up
    elif group == "data":
        dm = build(node, "data").scan()
        assert set(dm.split_sizes()) == {"train", "val", "test"} and min(dm.split_sizes().values()) > 0
        fits = {"classification": dm.num_classes >= 2, "multilabel": dm.num_outputs == len(dm.classes) >= 1,
                "regression": dm.num_outputs == 1}
        assert fits[dm.task]
    elif group == "strategy":
        # the group names of the default model (EfficientNet-Lite0), which the shipped options fit
        stages = build(node, "strategy")(["stem", *[f"blocks.{i}" for i in range(7)], "head"])
        assert stages and stages[0].start == 0 and "head" in stages[-1].trainable
    elif group == "optimizer":
        opt = build(node, "optimizer")([{"params": [torch.nn.Parameter(torch.zeros(2))]}])
        assert isinstance(opt, torch.optim.Optimizer)
    elif group == "scheduler":
        shape = build(node, "scheduler")
        assert 0.0 <= shape(0, 100) <= 1.0 and 0.0 <= shape(99, 100) <= 1.0
    elif group == "trainer":
        if node.get("accelerator") == "gpu" and not torch.cuda.is_available():
            with pytest.raises(TunelabError, match="gpu"):  # a clear error, not a CPU fallback
                build(node, "trainer", logger=False)
            return
        trainer = build(node, "trainer", logger=False, enable_checkpointing=False)
        assert trainer.max_epochs == cfg.trainer.max_epochs
    elif group == "callbacks":
        for name, cb in node.items():
            assert build(cb, f"callbacks.{name}") is not None
    elif group == "logger":
        assert str(node.tracking_uri).startswith("sqlite:///") and node.experiment_name
    elif group == "paths":
        assert Path(node.log_dir).is_absolute()
    elif group == "regularizer":
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        if "_target_" not in node:  # regularizer=none
            return
        penalty = build(node, "regularizer")(model, {"1.weight", "1.bias"})(model)
        assert penalty.item() > 0  # the head's beta term; the backbone equals its reference
    elif group == "loss":  # built for each task it declares, then called on that task's outputs
        for task in get_object(node._target_).tasks:
            run = {"task": task, "num_outputs": 3, "class_counts": [2, 3, 5], "num_samples": 10}
            loss = build_point(cfg, "loss", run)
            targets = {"classification": torch.tensor([0, 2]), "multilabel": torch.tensor([[1, 0, 1], [0, 1, 0]]),
                       "regression": torch.tensor([0.5, -1.0])}[task]
            outputs = torch.randn(2) if task == "regression" else torch.randn(2, 3)
            assert loss(outputs, targets).ndim == 0 and torch.isfinite(loss(outputs, targets))
    elif group == "mixup":
        mixer = build_point(cfg, "mixup", {"task": "classification", "num_outputs": 3, "modality": "image", "seed": 0})
        if "_target_" not in node:  # mixup=none
            assert mixer is None
            return
        _, soft = mixer(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 1]), step=0)
        assert torch.allclose(soft.sum(1), torch.ones(4))
    elif group == "debug":
        assert cfg.trainer.limit_train_batches <= 5 and cfg.data.batch_size <= 8
    elif group == "hparams_search":
        _check_search_space(choice, tmp_path)
    else:  # a group added later: every run's checks pass and it builds into a run's parts
        from tunelab.engine.validation import check_config

        check_config(cfg)
        assert build_parts(cfg).module is not None


def _check_search_space(choice: str, tmp_path: Path) -> None:
    """Every searched key exists (a value or a config group) and parses to an Optuna distribution."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_plugins.tunelab_optuna_sweeper.study import distribution

    with initialize_config_dir(str(CONF), version_base="1.3"):
        full = compose("train", overrides=[f"hparams_search={choice}", f"paths.root_dir={tmp_path}"],
                       return_hydra_config=True)
    sweeper = full.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.params and sweeper.study_name == choice
    for key, expression in sweeper.params.items():
        assert key in GROUPS or OmegaConf.select(full, key) is not None, f"{choice}: searches unknown key {key}"
        if key in GROUPS:  # every searched choice of a group exists
            for value in str(expression).removeprefix("choice(").rstrip(")").split(","):
                assert (CONF / key / f"{value.strip()}.yaml").is_file(), f"{choice}: no {key}={value.strip()}"
        assert distribution(OverridesParser.create().parse_overrides([f"{key}={expression}"])[0])


# choices with a mandatory value (???): what a user would pass, pointed at tiny local data / checkpoints
_EXTRA = {
    ("model", "hf_text"): lambda tmp, req: [f"model.path={req.getfixturevalue('tiny_bert')}"],
    ("model", "hf_speech"): lambda tmp, req: [f"model.path={req.getfixturevalue('tiny_wav2vec2')}"],
    ("data", "text_table"): lambda tmp, req: [f"data.source.path={write_text_csv(tmp / 'texts.csv')}"],
    ("data", "spoken_digits"): lambda tmp, req: [f"data.source.root={req.getfixturevalue('spoken_digits')}"],
    ("data", "audio_folder"): lambda tmp, req: [f"data.source.root={write_audio_folder(tmp / 'audio')}"],
    ("data", "audio_csv"): lambda tmp, req: [f"data.source.path={path_table(write_audio_folder(tmp / 'a'), '*.wav')}"],
    ("data", "image_folder"): lambda tmp, req: [f"data.source.root={write_image_folder(tmp / 'images')}"],
    ("data", "image_csv"): lambda tmp, req: [f"data.source.path={path_table(write_image_folder(tmp / 'i'), '*.png')}"],
}


@pytest.mark.parametrize("group,choice", CHOICES, ids=[f"{g}={c}" for g, c in CHOICES])
def test_config_choice_composes_and_instantiates(group, choice, cfg_factory, tmp_path, request):
    if (group, choice) == ("data", "fashion_mnist"):
        skip_without_fashion()
    extra = _EXTRA.get((group, choice), lambda tmp, req: [])(tmp_path, request)
    cfg = cfg_factory(f"{group}={choice}", *extra)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    _instantiate_group(cfg, group, tmp_path, choice)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds(name, cfg_factory, request):
    cfg = cfg_factory(f"experiment={name}")
    if cfg.data.name == "fashion_mnist":
        skip_without_fashion()
    if cfg.data.name == "spoken_digits":  # the session's small synthesised cut, not all 960 clips
        cfg = cfg_factory(f"experiment={name}", f"data.source.root={request.getfixturevalue('spoken_digits')}")
    parts = build_parts(cfg)
    out = parts.module.eval()(model_inputs(parts.adapter))
    assert out.shape == (2, parts.datamodule.num_outputs)
    header = (REPO / "experiments" / f"{name}.yaml").read_text()
    assert f"tunelab-train experiment={name}" in header, "experiment files say how to run them"
