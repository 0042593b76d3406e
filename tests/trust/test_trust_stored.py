"""Issue 19 item 6: a stored config runs no code. The config a trained model is rebuilt from
(inside its checkpoint, ``resolved_config.yaml`` beside it, an MLflow run's ``config.yaml`` and
``model_meta.json``, a registered model's artifacts) may have been written by anyone who can
write a shared store or a copied folder. Every load path holds it to the rules of a config typed
on the command line before anything is built, and a checkpoint carries its own config.

Each payload below creates a marker file when its stored config is built the way it used to be
(``hydra.utils.instantiate`` of the loaded YAML): the positive controls show that, then every
route into tunelab refuses it in one line naming the file or run and the target, and the marker
never appears.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from helpers.runs import TINY, mlflow_runs

from tunelab.errors import TunelabError

pytestmark = pytest.mark.slow  # every test reads the real run the trained_run fixture trains


def _touch(marker: Path) -> dict:
    return {"_target_": "pathlib.Path.touch", "_args_": [{"_target_": "pathlib.Path", "_args_": [str(marker)]}]}


def _write(marker: Path) -> dict:
    return {"_target_": "pathlib.Path.write_text", "_args_": [{"_target_": "pathlib.Path", "_args_": [str(marker)]}, "x"]}


def _quietly(build):
    """A payload runs while Hydra builds the nested node; what the outer target then makes of the
    result (an error, mostly) does not matter."""
    def run(cfg, meta):
        with contextlib.suppress(Exception):
            build(cfg, meta)
    return run


def payloads(marker: Path) -> dict:
    """name -> (plant(config, meta), what the refusal names, the unsafe build that runs it).
    Every way a stored config reaches a target: the node tunelab builds, a nested node, a node it
    never builds, a target assembled by interpolation or read from the loader's environment, and
    the model meta's ``model_kwargs`` (arguments of the model target, built with it). Targets
    that Hydra's own block-list lets through (it stops os.system and subprocess)."""
    model = lambda node: lambda config, meta: config.update(model=node)  # noqa: E731
    build_model = lambda cfg, meta: instantiate(cfg.model)  # noqa: E731
    return {
        "model-target": (model(_touch(marker)), "pathlib.Path.touch", build_model),
        "nested-target": (lambda config, meta: config["optimizer"].update(
            betas={"_target_": "shutil.copyfile", "src": __file__, "dst": str(marker)}), "shutil.copyfile",
            _quietly(lambda cfg, meta: instantiate(cfg.optimizer))),
        "unbuilt-callback": (lambda config, meta: config["callbacks"].update(evil=_write(marker)),
                             "pathlib.Path.write_text", lambda cfg, meta: instantiate(cfg.callbacks.evil)),
        # spelled under an allowed module, it resolves to pathlib.Path.touch (trained.py imports Path)
        "interpolated-target": (lambda config, meta: config.update(
            g={"method": "Path.touch"}, model={**_touch(marker), "_target_": "tunelab.engine.trained.${g.method}"}),
            "model._target_='tunelab.engine.trained.${g.method}' is an interpolation", build_model),
        "env-target": (model({**_touch(marker), "_target_": "${oc.env:TUNELAB_TEST_UNSET,pathlib.Path.touch}"}),
                       "${oc.env:TUNELAB_TEST_UNSET", build_model),
        "meta-model-kwargs": (lambda config, meta: meta["model_kwargs"].update(kwargs=_touch(marker)),
                              "pathlib.Path.touch",
                              _quietly(lambda cfg, meta: instantiate(cfg.model, **meta["model_kwargs"]))),
    }


PAYLOADS = list(payloads(Path("m")))


# -- planting --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stored(trained_run):
    """The run's best checkpoint as tunelab wrote it (config and meta inside)."""
    checkpoint = torch.load(trained_run.best, map_location="cpu", weights_only=True)
    assert {"config", "meta"} <= set(checkpoint["tunelab"]), "the checkpoint does not carry its config"
    return checkpoint


def _save(checkpoint: dict, path: Path, config: dict | None = None, meta: dict | None = None) -> Path:
    """``checkpoint`` with ``config``/``meta`` inside, or (None) without: a checkpoint from before
    tunelab kept its config inside."""
    checkpoint = {**checkpoint, "tunelab": {k: v for k, v in checkpoint["tunelab"].items() if k not in ("config", "meta")}}
    if config is not None:
        checkpoint["tunelab"].update(config=config, meta=meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def _write_files(folder: Path, config: dict, meta: dict, name: str = "resolved_config.yaml") -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / "model_meta.json").write_text(json.dumps(meta))
    return folder / name, folder / "model_meta.json"


def planted(stored: dict, payload: str, marker: Path) -> tuple[dict, dict]:
    config, meta = copy.deepcopy(stored["tunelab"]["config"]), copy.deepcopy(stored["tunelab"]["meta"])
    payloads(marker)[payload][0](config, meta)
    return config, meta


def plant_inside(stored: dict, folder: Path, config: dict, meta: dict) -> Path:
    """A checkpoint that carries the planted config, alone in a folder."""
    return _save(stored, folder / "epoch01.ckpt", config, meta)


def plant_beside(stored: dict, folder: Path, config: dict, meta: dict) -> Path:
    """An older checkpoint (no config inside) in a run folder whose files were replaced."""
    _write_files(folder / "run", config, meta)
    return _save(stored, folder / "run" / "checkpoints" / "epoch01.ckpt")


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> Path:
    """A store someone else can write (one for the module: a new SQLite store takes seconds)."""
    store = tmp_path_factory.mktemp("shared") / "mlflow.db"
    MlflowClient(f"sqlite:///{store}").create_experiment("shared", artifact_location=str(store.parent / "artifacts"))
    return store


def plant_run(stored: dict, store: Path, folder: Path, config: dict, meta: dict, inside: bool = False) -> str:
    """A run in ``store`` whose artifacts hold the planted config: as config.yaml + model_meta.json
    beside an older checkpoint (the names a training run logs), or inside its checkpoint."""
    client = MlflowClient(f"sqlite:///{store}")
    run_id = client.create_run(client.get_experiment_by_name("shared").experiment_id).info.run_id
    ckpt = _save(stored, folder / "upload" / "epoch01.ckpt", *((config, meta) if inside else ()))
    client.log_artifact(run_id, str(ckpt), "checkpoints")
    if not inside:
        for path in _write_files(folder / "upload", config, meta, "config.yaml"):
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id


def _runs(store: Path) -> list[str]:
    client = MlflowClient(f"sqlite:///{store}")
    return sorted(r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()]))


def one_line(text: str) -> str:
    (line,) = [line for line in text.splitlines() if "error" in line.lower()]
    assert "Traceback" not in text, text[-3000:]
    return line


# -- positive controls -----------------------------------------------------------------------------


@pytest.mark.parametrize("payload", PAYLOADS)
def test_each_planted_config_really_runs_code_when_built_naively(stored, tmp_path, payload):
    """Control for every refusal below: the planted stored config, loaded as YAML/JSON and built
    by Hydra (what loading a trained model did), creates the marker."""
    marker = tmp_path / "pwned"
    config_file, meta_file = _write_files(tmp_path, *planted(stored, payload, marker))
    payloads(marker)[payload][2](OmegaConf.load(config_file), json.loads(meta_file.read_text()))
    assert marker.exists(), payload


# -- wherever it is stored ---------------------------------------------------------------------------


@pytest.mark.parametrize("spot", ["inside the checkpoint", "beside the checkpoint", "run artifacts",
                                  "inside the run's checkpoint"])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_planted_stored_config_is_refused_wherever_it_is_stored(stored, shared_store, tmp_path, payload, spot):
    """What every load path starts with (trained.resolve: a checkpoint, runs:/ID): refused in one
    line naming where the config was read and the target, before anything is built."""
    from tunelab.engine.trained import resolve

    marker = tmp_path / "pwned"
    config, meta = planted(stored, payload, marker)
    client = None
    if spot == "inside the checkpoint":
        source = str(plant_inside(stored, tmp_path / "copied", config, meta))
        where = f"stored in {source}"
    elif spot == "beside the checkpoint":
        source = str(plant_beside(stored, tmp_path / "copied", config, meta))
        where = str(tmp_path / "copied" / "run" / ("model_meta.json" if payload.startswith("meta") else "resolved_config.yaml"))
    else:
        run_id = plant_run(stored, shared_store, tmp_path, config, meta, inside=spot.startswith("inside"))
        source, client = f"runs:/{run_id}", MlflowClient(f"sqlite:///{shared_store}")
        where = f"epoch01.ckpt of run {run_id}" if spot.startswith("inside") else \
            f"{'model_meta.json' if payload.startswith('meta') else 'config.yaml'} of run {run_id}"
    with pytest.raises(TunelabError) as refused:
        resolve(source, client, tmp_path / "download")
    message = str(refused.value)
    assert "\n" not in message and message.startswith("refused ") and where in message, message
    assert payloads(marker)[payload][1] in message, message
    assert not marker.exists()


def test_trust_remote_code_anywhere_in_a_stored_config_is_refused(stored, tmp_path):
    """``trust_remote_code`` runs the Python files shipped with a model folder (shown in the
    allow-list's own tests); a stored config may not switch it on, at any depth, in any spelling
    of true; ``false`` is harmless and loads."""
    from tunelab.engine.trained import from_checkpoint

    for i, (where, value) in enumerate([("model", True), ("model.config_overrides", True),
                                        ("model.kwargs", "yes"), ("data", 1)]):
        config = copy.deepcopy(stored["tunelab"]["config"])
        OmegaConf.update(cfg := OmegaConf.create(config), f"{where}.trust_remote_code", value, force_add=True)
        ckpt = plant_inside(stored, tmp_path / str(i), OmegaConf.to_container(cfg), stored["tunelab"]["meta"])
        with pytest.raises(TunelabError, match=rf"^refused the config stored in {ckpt}: "
                                               rf"{where}.trust_remote_code={value!r} would run Python"):
            from_checkpoint(ckpt)
    harmless = copy.deepcopy(stored["tunelab"]["config"])
    harmless["model"]["trust_remote_code"] = False
    assert from_checkpoint(plant_inside(stored, tmp_path / "false", harmless, stored["tunelab"]["meta"])).cfg


# -- every load path ------------------------------------------------------------------------------


@pytest.fixture
def in_process(monkeypatch, tmp_path):
    """Console scripts called in this process: their umask setting undone, no store outside tmp."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mask = os.umask(0o022)
    os.umask(mask)
    yield
    os.umask(mask)


def _cli(main, argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as ended:
        main(argv)
    return ended.value.code, capsys.readouterr().err


@pytest.mark.parametrize("path", ["eval checkpoint", "eval runs:/ID", "eval models:/", "export", "monitor", "init_from",
                                  "pyfunc (inside the checkpoint)", "pyfunc (config artifact)"])
@pytest.mark.parametrize("payload", ["interpolated-target", "meta-model-kwargs"])
def test_every_load_path_refuses_a_planted_stored_config(stored, shared_store, tmp_path, path, payload, in_process,
                                                         capsys):
    """tunelab-eval (a checkpoint, runs:/ID, models:/NAME/VERSION), tunelab-export,
    tunelab-monitor, ``init_from`` and the registered pyfunc model, given a stored config whose
    model is built with ``Path.touch`` by the two routes the build-time check never saw (a
    target assembled by interpolation, the meta's model arguments): the console scripts exit 2
    with one line naming where it was read and the target (init_from and the pyfunc raise that
    line), nothing is built or exported, and no MLflow run starts."""
    from tunelab.cli import eval as eval_cli
    from tunelab.cli import export
    from tunelab.cli import monitor

    marker = tmp_path / "pwned"
    config, meta = planted(stored, payload, marker)
    ckpt = plant_inside(stored, tmp_path / "copied", config, meta)
    run_id = plant_run(stored, shared_store, tmp_path, config, meta)
    runs = _runs(shared_store)
    beside = "model_meta.json" if payload.startswith("meta") else "config.yaml"
    where = {"init_from": str(ckpt), "eval checkpoint": str(ckpt), "export": str(ckpt), "monitor": str(ckpt)}.get(
        path, str(tmp_path / "model" / "artifacts") if path.startswith("pyfunc") else f"{beside} of run {run_id}")
    if path == "init_from":
        from conftest import compose_cfg

        from tunelab.engine.build import build_parts

        with pytest.raises(TunelabError) as refused:
            build_parts(compose_cfg(tmp_path, [*TINY[1:], f"init_from={ckpt}"]))
        code, err = 2, f"error: {refused.value}"
    elif path.startswith("pyfunc"):
        import mlflow.pyfunc

        from tunelab.deploy import pyfunc_model

        artifacts = {"checkpoint": str(ckpt)}
        if "artifact" in path:  # registered before checkpoints carried their config
            files = _write_files(tmp_path / "old", config, meta)
            artifacts = {"checkpoint": str(_save(stored, tmp_path / "old" / "epoch01.ckpt")),
                         "config": str(files[0]), "meta": str(files[1])}
        mlflow.pyfunc.save_model(tmp_path / "model", python_model=pyfunc_model.__file__, artifacts=artifacts,
                                 pip_requirements=["tunelab"])
        with pytest.raises(TunelabError) as refused:
            mlflow.pyfunc.load_model(str(tmp_path / "model"))
        code, err = 2, f"error: {refused.value}"
    else:
        source = {"eval runs:/ID": f"runs:/{run_id}", "eval models:/": f"models:/{_register(shared_store, run_id)}/1"}
        main, argv = {"export": (export.main, ["--out", str(tmp_path / "exported")]),
                      "monitor": (monitor.main, [str(tmp_path)])}.get(path, (eval_cli.main, []))
        code, err = _cli(main, [source.get(path, str(ckpt)), *argv, "--store", str(shared_store)], capsys)
    assert code == 2, err[-3000:]
    line = one_line(err)
    assert f"refused {where}" in line or f"stored in {where}" in line, line
    assert payloads(marker)[payload][1] in line, line
    assert not marker.exists() and not (tmp_path / "exported").exists()
    assert _runs(shared_store) == runs and mlflow_runs(tmp_path) == []  # no run logged, here or there


def _register(store: Path, run_id: str) -> str:
    client = MlflowClient(f"sqlite:///{store}")
    name = f"shared-{run_id[:8]}"
    client.create_registered_model(name)
    client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)
    return name


def test_model_checkpoint_never_reads_a_stored_config_and_init_from_takes_a_lone_checkpoint(stored, trained_run,
                                                                                          tmp_path):
    """``model.checkpoint`` takes only a checkpoint's weights: one carrying a planted config
    loads (the config is never read, so never built) and the marker never appears; with it,
    ``init_from`` a legitimate checkpoint copied alone to an empty folder works."""
    from conftest import compose_cfg

    from tunelab.engine.build import build_parts

    marker = tmp_path / "pwned"
    evil = plant_inside(stored, tmp_path / "evil", *planted(stored, "model-target", marker))
    alone = tmp_path / "alone" / trained_run.best.name
    alone.parent.mkdir()
    alone.write_bytes(trained_run.best.read_bytes())
    parts = build_parts(compose_cfg(tmp_path, [*TINY[1:], f"model.checkpoint={evil}", f"init_from={alone}"]))
    assert evil.name in parts.adapter.description  # the model line names its weights
    assert parts.lineage["tunelab.init_from"] == str(alone) and parts.lineage["tunelab.init_from_skipped"] == "none"
    assert not marker.exists()


# -- legitimate runs still load -----------------------------------------------------------------------


def test_a_checkpoint_copied_alone_still_evaluates_exports_and_serves(trained_run, tmp_path, in_process, capsys):
    """Self-describing: the best checkpoint copied alone to an empty folder evaluates, exports and
    loads as a pyfunc model made from it alone; the run itself evaluates by runs:/ID; and a
    checkpoint from before checkpoints carried their config still loads from the files beside
    it. (tests/deploy/test_deploy.py monitors and registers runs whose checkpoints carry their config.)"""
    import mlflow.pyfunc
    import pandas as pd
    from PIL import Image

    from tunelab.cli import eval as eval_cli

    from tunelab.cli import export

    from tunelab.data.preprocess import encode_image
    from tunelab.deploy import pyfunc_model

    alone = tmp_path / "empty" / trained_run.best.name
    alone.parent.mkdir()
    alone.write_bytes(trained_run.best.read_bytes())
    old = _save(torch.load(alone, map_location="cpu", weights_only=True), tmp_path / "old" / "checkpoints" / "e.ckpt")
    for name in ("resolved_config.yaml", "model_meta.json"):
        (tmp_path / "old" / name).write_bytes((trained_run.folder / name).read_bytes())
    digits = tmp_path / "digits"  # five images of each of the model's classes: quick to evaluate on
    for label in range(10):
        (digits / str(label)).mkdir(parents=True)
        for i in range(5):
            Image.new("L", (32, 32), 25 * label + i).save(digits / str(label) / f"{i}.png")
    (run,) = mlflow_runs(trained_run.home)
    store = trained_run.home / "outputs" / "mlflow.db"
    data = ["data=image_folder", f"data.source.root={digits}", "data.image_size=32", "data.num_workers=0",
            "data.val_fraction=0.2", "data.test_fraction=0.2"]
    for source in (str(alone), f"runs:/{run.info.run_id}", str(old)):
        eval_cli.main([source, *data, "--no-log", "--store", str(store)])
        assert "test/acc" in capsys.readouterr().out, source

    export.main([str(alone), "--out", str(tmp_path / "exported"), "--format", "torchscript"])
    assert (tmp_path / "exported" / "model.ts").is_file()

    mlflow.pyfunc.save_model(tmp_path / "model", python_model=pyfunc_model.__file__, artifacts={"checkpoint": str(alone)},
                             pip_requirements=["tunelab"])
    served = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    frame = served.predict(pd.DataFrame({"image": [encode_image(Image.new("RGB", (32, 32), (90, 90, 90)))]}))
    assert frame["label"].iloc[0] in [str(i) for i in range(10)]


# -- tunelab-predict: an export folder's preprocessing ---------------------------------------------------


def test_predict_refuses_preprocessing_that_ships_code(tmp_path, in_process, capsys):
    """tunelab-predict rebuilds no config, but reads an export's tokenizer with transformers: a
    tokenizer_config.json whose auto_map names Python in the folder runs it once trusted (the
    control, in a child process with its own module cache). tunelab-predict refuses it in one line
    (never transformers' question at a terminal) and the marker never appears."""
    from tunelab.cli import predict

    marker = tmp_path / "pwned"
    folder = tmp_path / "exported"
    (folder / "preprocess").mkdir(parents=True)
    (folder / "tunelab_export.json").write_text(json.dumps({"task": "classification", "classes": ["a", "b"],
                                                            "inputs": ["input_ids"], "preprocess": {"modality": "text"}}))
    (folder / "preprocess" / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}, "tokenizer_class": "EvilTokenizer"}))
    (folder / "preprocess" / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import PreTrainedTokenizer\n\n\nclass EvilTokenizer(PreTrainedTokenizer):\n    pass\n")
    control = (f"from transformers import AutoTokenizer\n"
               f"AutoTokenizer.from_pretrained({str(folder / 'preprocess')!r}, trust_remote_code=True)")
    subprocess.run([sys.executable, "-c", control], capture_output=True, timeout=300, check=False,
                   env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"})
    assert marker.exists(), "control: the folder's Python did not run when trusted"
    marker.unlink()

    (tmp_path / "reviews.csv").write_text("text\ngreat\n")
    code, err = _cli(predict.main, [str(folder), str(tmp_path / "reviews.csv")], capsys)
    assert code == 2, err[-3000:]
    line = one_line(err)
    assert str(folder / "preprocess") in line and "trust_remote_code" in line, line
    assert not marker.exists()
