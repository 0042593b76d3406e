"""What many test files share: the smallest real training, tunelab-train run in a tunelab home
with fake secrets in its environment, and what such a run leaves behind (its MLflow runs, its
final weights), plus a checkpoint that runs code when unpickled."""

from __future__ import annotations

import os
import pickle
import shlex
import subprocess
from pathlib import Path

import torch
from conftest import run_cli
from mlflow.tracking import MlflowClient

from tunelab.config import build
from tunelab.data.preprocess import load_image

# The smallest real training: a random-init tiny EfficientNet on 32 px MNIST, 2 epochs of 2 batches.
TINY = ("debug=smoke", "model.arch=test_efficientnet", "model.pretrained=false", "data.image_size=32",
        "retention.enabled=false", "data.ood={}")
# Fake credentials in every training's environment (the store is local SQLite, so they go unused).
SECRETS = {"MLFLOW_TRACKING_TOKEN": "tok-SECRET-1234", "MLFLOW_TRACKING_PASSWORD": "pw-SECRET-5678",
           "MLFLOW_TRACKING_USERNAME": "alice"}


class RunsCode:
    """Unpickling this runs ``touch <marker>``: the payload of a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def plant_malicious_checkpoint(path: Path, marker: Path, like: Path | None = None, fmt: str = "zip") -> Path:
    """A Lightning-shaped checkpoint (a real one's contents when ``like`` is given) whose
    ``hyper_parameters`` unpickle to ``os.system("touch <marker>")``. ``fmt``: torch's zip format,
    its legacy format, or a bare pickle (protocol 5) with a .ckpt name."""
    checkpoint = (torch.load(like, map_location="cpu", weights_only=True) if like else
                  {"epoch": 0, "global_step": 0, "pytorch-lightning_version": "2.6.0", "state_dict": {}})
    checkpoint["hyper_parameters"] = {"cfg": RunsCode(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "pickle":
        path.write_bytes(pickle.dumps(checkpoint, protocol=5))
    else:
        torch.save(checkpoint, path, _use_new_zipfile_serialization=fmt == "zip")
    return path


def train_cli(home: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    home.mkdir(parents=True, exist_ok=True)
    return run_cli(home, *TINY, *args, env={**SECRETS, **(env or {})})


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if ": error: " in line]


def mlflow_runs(home: Path) -> list:
    store = home / "outputs" / "mlflow.db"
    if not store.is_file():
        return []
    client = MlflowClient(f"sqlite:///{store}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def runs(root: Path, experiment: str = "tunelab"):
    client = MlflowClient(f"sqlite:///{root}/outputs/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    (last,) = sorted(root.glob("outputs/runs/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)[-1:]
    return torch.load(last, map_location="cpu", weights_only=True)["state_dict"]


# A config that is refused before any training: a tiny random-init model, on images when IMAGE.
TINY_MODEL = ["model.arch=test_efficientnet", "model.pretrained=false", "retention.enabled=false"]
IMAGE = [*TINY_MODEL, "data.image_size=32", "data.max_train_samples=64"]


def nothing_written(root: Path) -> None:
    """No MLflow store, run or checkpoint: nothing that could pass for a (partly) successful run."""
    assert not list(root.rglob("mlflow.db")), "an MLflow store was created"
    assert not list(root.rglob("mlartifacts")), "MLflow artifacts were written"
    assert not list(root.rglob("*.ckpt")), "a checkpoint was written"


# A grid sweep of four smoke runs.
SMOKE_GRID = ["-m", "debug=smoke", "optimizer.lr=1e-3,3e-4", "strategy=full,linear_probe"]


def sweep_runs(uri: str) -> tuple[list, list]:
    """(parents, children) of every sweep in the store's 'tunelab' experiment."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tunelab")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("tunelab.sweep") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) + len(children) == len(runs), "a run that is neither parent nor child"
    return parents, children


def store_uri(home: Path) -> str:
    return f"sqlite:///{home}/outputs/mlflow.db"


def finished_sweep(uri: str, trials: int) -> tuple:
    """The contract every launcher keeps: one FINISHED parent and ``trials`` FINISHED children
    nested under it. Returns (parent, children)."""
    parents, children = sweep_runs(uri)
    assert len(parents) == 1 and len(children) == trials, (len(parents), len(children))
    (parent,) = parents
    assert [parent.info.status, *(c.info.status for c in children)] == ["FINISHED"] * (trials + 1)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    return parent, children


def save_test_images(cfg, folder: Path, count: int = 12) -> Path:
    """The first ``count`` test-split images of ``cfg``'s data saved as PNGs: new images to predict."""
    table, indices = build(cfg.data, "data").scan().splits["test"]
    folder.mkdir()
    for n, j in enumerate(indices[:count]):
        load_image(table.items[j]).save(folder / f"{n:02d}.png")
    return folder
