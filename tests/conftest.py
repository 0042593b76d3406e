"""Tests compose the REAL config tree from conf/ and shrink it (debug=smoke, tmp paths)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from PIL import Image

from tunelab.config import conf_dir

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


def skip_without_fashion() -> None:
    if not (FASHION_ROOT / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (scripts/setup.sh installs Debian's dataset-fashion-mnist as root)")


def compose_cfg(tmp_path: Path, overrides: list[str] = (), smoke: bool = True) -> DictConfig:
    """The real composed config, writing only under ``tmp_path``."""
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[*(["debug=smoke"] if smoke else []), f"paths.root_dir={tmp_path}",
                       f"paths.output_dir={tmp_path}/run", *overrides],
        )
    with open_dict(cfg):  # compose() has no Hydra runtime; drop nothing else
        cfg.pop("hydra", None)
    return cfg


@pytest.fixture
def cfg_factory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return lambda *overrides, smoke=True: compose_cfg(tmp_path, list(overrides), smoke=smoke)


def write_image_folder(root: Path, classes: int = 3, per_class: int = 6, size: int = 20) -> Path:
    """Tiny PNGs whose class is visible (brightness), one sub-folder per class."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.random((size, size)) * 60 + c * 80).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "images")
