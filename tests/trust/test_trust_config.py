"""A config, an experiment file or a command line cannot run code, change the environment tunelab
trusts, write outside the outputs, or be silently ignored (issue: trust boundaries).

Every attack plants a payload that creates a marker file. A positive control shows the payload
runs when the same config is handed to the library tunelab guards (Hydra's ``instantiate``,
``logging.config.dictConfig``, git, transformers); then tunelab refuses it in one line and the
marker never appears.
"""

from __future__ import annotations

import logging.config
import os
import subprocess
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from hydra.utils import instantiate
from omegaconf import OmegaConf
from helpers.runs import error_lines, mlflow_runs, plant_malicious_checkpoint, train_cli

import tunelab
from tunelab.config import build, check_targets
from tunelab.config.targets import refusal
from tunelab.errors import TunelabError

SMOKE = ["debug=smoke", "model.arch=test_efficientnet", "model.pretrained=false", "data.image_size=32"]
TEXT = ["debug=smoke", "model=minilm", "data=drug_reviews"]


def experiment(tmp_path: Path, body: str, name: str = "evil") -> list[str]:
    """Overrides that load ``body`` as an experiment file from a downloaded config folder."""
    folder = tmp_path / "downloaded" / "experiment"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(f"# @package _global_\n{body}")
    return [f"hydra.searchpath=[file://{folder.parent}]", f"experiment={name}"]


def refused(overrides: list[str], match: str, base: list[str] = SMOKE) -> str:
    with pytest.raises(TunelabError, match=match) as err:
        tunelab.check([*base, *overrides], deep=False)
    assert "\n" not in str(err.value)
    return str(err.value)


# -- 1. interpolation inside _target_ ------------------------------------------------------------------
def _interpolated(marker: Path, pickle_file: Path) -> dict[str, dict]:
    return {
        "spelled-under-tunelab": {"g": {"w": "Path.touch"},
                                  "cb": {"_target_": "tunelab.config.${g.w}",
                                         "_args_": [{"_target_": "pathlib.Path", "_args_": [str(marker)]}]}},
        "torch.load-under-torch.optim": {"g": {"load": "optimizer.torch.load"},
                                         "cb": {"_target_": "torch.optim.${g.load}", "f": str(pickle_file),
                                                "weights_only": False}},
        "node-made-by-oc.create": {"cb": ("${oc.create:{_target_: pathlib.Path.touch, _args_: [{_target_: pathlib.Path, "
                                          f"_args_: ['{marker}']}}]}}}}")},
    }


@pytest.mark.parametrize("route", ["spelled-under-tunelab", "torch.load-under-torch.optim", "node-made-by-oc.create"])
def test_an_interpolated_or_resolver_made_target_is_refused(tmp_path, route):
    """Judged on what will be built: the allow-list once judged the unresolved text and let an
    unresolvable name through."""
    control, marker = tmp_path / "control", tmp_path / "pwned"
    for path in (control, marker):
        plant_malicious_checkpoint(path.with_suffix(".pkl"), path)
    live = OmegaConf.create(_interpolated(control, control.with_suffix(".pkl"))[route])
    instantiate(live.cb)
    assert control.exists(), "positive control: the payload runs when Hydra builds it"

    cfg = OmegaConf.create(_interpolated(marker, marker.with_suffix(".pkl"))[route])
    with pytest.raises(TunelabError, match=r"cb\._target_=.*(interpolated|outside the allowed targets)"):
        check_targets(cfg)
    with pytest.raises(TunelabError):
        build(cfg.cb, "cb")
    assert not marker.exists()


@pytest.mark.slow
def test_an_experiment_file_with_an_interpolated_target_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    args = experiment(tmp_path, f"run_name: Path.touch\ncallbacks:\n  evil:\n    _target_: tunelab.config.${{run_name}}\n"
                                f"    _args_: ['{marker}']\n")
    proc = train_cli(tmp_path / "home", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = error_lines(proc)
    assert "callbacks.evil._target_" in line and "interpolated" in line
    assert not marker.exists() and mlflow_runs(tmp_path / "home") == []


# -- 2. the environment: hydra.job.env_set, a launcher's env_vars, git ------------------------------------
SECURITY_ENV = ["TUNELAB_ALLOWED_TARGETS", "HF_HUB_OFFLINE", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",
                "MLFLOW_TRACKING_URI", "GIT_CONFIG_COUNT", "PYTHONPATH"]


@pytest.mark.parametrize("variable", SECURITY_ENV)
@pytest.mark.parametrize("route", ["experiment-env_set", "cli-env_set", "ray-env_vars"])
def test_a_config_cannot_set_the_environment(tmp_path, variable, route):
    if route == "experiment-env_set":
        overrides = experiment(tmp_path, f"hydra:\n  job:\n    env_set:\n      {variable}: '1'\n")
    elif route == "cli-env_set":
        overrides = [f"++hydra.job.env_set.{variable}=1"]
    else:
        overrides = ["hydra/launcher=ray", f"++hydra.launcher.ray.init.runtime_env.env_vars.{variable}=1"]
    refused(overrides, rf"{variable}: a config may not set environment variables")


@pytest.mark.slow
def test_env_set_cannot_widen_the_allow_list(tmp_path):
    """Positive control: with TUNELAB_ALLOWED_TARGETS=pathlib in the user's own environment the
    callback's Path.touch runs. Set by the config's env_set, tunelab refuses before Hydra starts."""
    control, marker = tmp_path / "control", tmp_path / "pwned"
    callback = "+callbacks.evil={_target_: pathlib.Path.touch, _args_: [{_target_: pathlib.Path, _args_: ['%s']}]}"
    train_cli(tmp_path / "home1", callback % control, env={"TUNELAB_ALLOWED_TARGETS": "pathlib"})
    assert control.exists(), "positive control: the user's environment really grants os.system"

    args = experiment(tmp_path, "hydra:\n  job:\n    env_set:\n      TUNELAB_ALLOWED_TARGETS: pathlib\n")
    proc = train_cli(tmp_path / "home2", *args, callback % marker)
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert "hydra.job.env_set.TUNELAB_ALLOWED_TARGETS" in line
    assert not marker.exists() and not (tmp_path / "home2" / "outputs").exists()


def test_git_runs_with_a_clean_environment(tmp_path, monkeypatch):
    """GIT_CONFIG_* in the environment can make ``git status`` run a command (core.fsmonitor);
    the commit tunelab records is read with a clean environment."""
    from tunelab.tracking.runs import git_commit

    control, marker = tmp_path / "control", tmp_path / "pwned"
    hook = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "core.fsmonitor"}
    subprocess.run(["git", "status"], cwd=REPO, capture_output=True, check=False,
                   env={**os.environ, **hook, "GIT_CONFIG_VALUE_0": f"touch {control}; false"})
    assert control.exists(), "positive control: the variables make git run a command"
    for key, value in {**hook, "GIT_CONFIG_VALUE_0": f"touch {marker}; false"}.items():
        monkeypatch.setenv(key, value)
    assert git_commit() != ""
    assert not marker.exists()


# -- 3. Hydra's logging, launcher and output settings ----------------------------------------------------
def _logging_payloads(marker: Path) -> dict[str, dict]:
    handler = {"class": "logging.FileHandler", "filename": str(marker)}
    return {
        "file-handler-anywhere": {"handlers": {"evil": handler}},
        "handler-factory": {"handlers": {"evil": {"()": "os.system", "command": f"touch {marker}"}}},
        "formatter-factory": {"formatters": {"evil": {"()": "os.system", "command": f"touch {marker}"}}},
        "filter-factory": {"filters": {"evil": {"()": "os.system", "command": f"touch {marker}"}}},
        "foreign-handler-class": {"handlers": {"evil": {"class": "logging.handlers.WatchedFileHandler",
                                                        "filename": str(marker)}}},
    }


@pytest.mark.parametrize("section", ["job_logging", "hydra_logging"])
@pytest.mark.parametrize("payload", ["file-handler-anywhere", "handler-factory", "formatter-factory", "filter-factory",
                                     "foreign-handler-class"])
def test_a_config_cannot_make_logging_write_files_or_call_functions(tmp_path, section, payload):
    control, marker = tmp_path / "control", tmp_path / "pwned"
    try:
        logging.config.dictConfig({"version": 1, "incremental": False, "disable_existing_loggers": False,
                                   **_logging_payloads(control)[payload]})
    except (ValueError, TypeError):
        pass  # a factory returning no handler fails after it ran
    finally:
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})
    assert control.exists(), "positive control: dictConfig runs the payload"

    body = yaml.safe_dump({"hydra": {section: _logging_payloads(marker)[payload]}})
    refused(experiment(tmp_path, body), rf"hydra\.{section}\.")
    assert not marker.exists()


@pytest.mark.slow
def test_a_log_file_outside_the_outputs_is_refused_before_hydra_starts(tmp_path):
    marker = tmp_path / "site-packages" / "evil.pth"
    marker.parent.mkdir()
    body = yaml.safe_dump({"hydra": {"job_logging": {"handlers": {"evil": {"class": "logging.FileHandler",
                                                                          "filename": str(marker)}}}}})
    proc = train_cli(tmp_path / "home", *experiment(tmp_path, body))
    assert proc.returncode == 2
    assert "hydra.job_logging.handlers.evil.filename" in error_lines(proc)[0]
    assert not marker.exists() and not (tmp_path / "home" / "outputs").exists()


@pytest.mark.parametrize("key, value, typed", [
    ("setup", ["touch /tmp/x"], "[touch /tmp/x]"),
    ("additional_parameters", {"wrap": "touch /tmp/x"}, "{wrap: touch /tmp/x}")])
def test_launcher_settings_that_run_commands_come_only_from_the_command_line(tmp_path, key, value, typed):
    body = yaml.safe_dump({"hydra": {"launcher": {key: value}}})
    refused(["hydra/launcher=slurm", *experiment(tmp_path, body)], rf"hydra\.launcher\.{key} runs commands")
    assert "config valid" in tunelab.check([*SMOKE, "hydra/launcher=slurm", f"++hydra.launcher.{key}={typed}"], deep=False)


@pytest.mark.parametrize("key, value, extra", [
    ("hydra.run.dir", "{}/elsewhere", []), ("hydra.sweep.dir", "{}/elsewhere", []),
    ("hydra.sweeper.storage", "sqlite:///{}/elsewhere.db", ["hydra/sweeper=optuna"]),
    ("hydra.output_subdir", "../../../../../../../../{}/elsewhere", [])])
def test_an_output_folder_outside_the_outputs_comes_only_from_the_command_line(tmp_path, key, value, extra):
    value = value.format(tmp_path)
    body = yaml.safe_dump(OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}={value}"])))
    refused([*extra, *experiment(tmp_path, body)], rf"{key} resolves to .*outside this run's outputs")
    assert "config valid" in tunelab.check([*SMOKE, *extra, f"{key}={value}"], deep=False)


@pytest.mark.slow
@pytest.mark.parametrize("override", ["hydra.sweeper._target_=os.system", "hydra.launcher._target_=builtins.eval",
                                      "--experimental-rerun"])
def test_refused_hydra_overrides_are_one_line(tmp_path, override):
    args = ["-m", override, "seed=1,2"] if override.startswith("hydra") else [override, str(tmp_path / "x.pickle")]
    proc = train_cli(tmp_path / "home", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert len(error_lines(proc)) == 1


@pytest.mark.slow
def test_a_yaml_python_tag_is_one_line_and_runs_nothing(tmp_path):
    marker, control = tmp_path / "pwned", tmp_path / "control"
    tag = '!!python/object/apply:os.system ["touch {}"]'
    yaml.unsafe_load(f"seed: {tag.format(control)}")
    assert control.exists(), "positive control: an unsafe YAML loader runs the tag"
    proc = train_cli(tmp_path / "home", *experiment(tmp_path, f"seed: {tag.format(marker)}\n"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "python/object/apply" in error_lines(proc)[0]
    assert not marker.exists()


# -- 4. allowed names, not allowed prefixes -------------------------------------------------------------
def _console_scripts() -> list[str]:
    return sorted(e.value.replace(":", ".") for e in entry_points(group="console_scripts")
                  if e.value.startswith("tunelab."))


def _metrics_that_load_models() -> list[str]:
    import inspect

    import torchmetrics

    found = set()
    for module in ("torchmetrics.multimodal", "torchmetrics.text", "torchmetrics.image", "torchmetrics.audio"):
        package = __import__(module, fromlist=["_"])
        for name in getattr(package, "__all__", []):
            obj = getattr(package, name)
            params = inspect.signature(obj).parameters if inspect.isclass(obj) else {}
            if issubclass(obj, torchmetrics.Metric) and any("model" in p or "feature" in p for p in params):
                found.add(f"{module}.{name}")
    return sorted(found)


def test_entry_points_and_model_loading_metrics_are_never_targets():
    """``tunelab.cli.ui.main`` would turn a run into an unauthenticated server; CLIPScore & co. load
    models (CLIPScore with trust_remote_code for some names). Discovered, not listed."""
    scripts, metrics = _console_scripts(), _metrics_that_load_models()
    assert "tunelab.cli.ui.main" in scripts and "torchmetrics.multimodal.CLIPScore" in metrics
    assert [t for t in scripts + metrics if refusal(t, "x") is None] == []
    for allowed in ("torch.optim.AdamW", "torch.optim.adamw.AdamW", "torchmetrics.classification.MulticlassAccuracy",
                    "lightning.pytorch.callbacks.ModelCheckpoint", "torch.optim.lr_scheduler.OneCycleLR"):
        assert refusal(allowed, "x") is None, allowed


def test_trust_remote_code_is_refused_anywhere(tmp_path):
    """A model folder's own Python runs with trust_remote_code (positive control); tunelab refuses
    the key wherever a config puts it, and loads such a folder without running it."""
    from transformers import AutoConfig

    def remote_code_model(folder: Path, marker: Path) -> Path:
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}}')
        (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                        "from transformers import PretrainedConfig\n"
                                        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
        return folder

    control, marker = tmp_path / "control", tmp_path / "pwned"
    AutoConfig.from_pretrained(remote_code_model(tmp_path / "a", control), trust_remote_code=True)
    assert control.exists(), "positive control: the folder's Python runs"
    folder = remote_code_model(tmp_path / "b", marker)
    for key in ("+model.config_overrides.trust_remote_code=true", "+model.config.trust_remote_code=true",
                "+data.trust_remote_code=true"):
        refused(TEXT + [key], r"trust_remote_code.*never runs", base=[])
    with pytest.raises(TunelabError, match="model.path="):
        tunelab.check([*TEXT, f"model.path={folder}"], deep=True)
    assert not marker.exists()


# -- 5. keys nothing reads --------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, key", [
    (["+seeed=3"], "seeed"), (["+optimiser.lr=0.1"], "optimiser"), (["+logger.experiment_nam=x"], "experiment_nam"),
    (["+perf.compiel=true"], "compiel"), (["+retention.enabeld=false"], "enabeld"), (["+optimizer.lrr=1"], "lrr"),
])
def test_a_misspelt_key_anywhere_is_one_line(overrides, key):
    refused(overrides, rf"\b{key}\b")


@pytest.mark.parametrize("body, key", [("optimiser:\n  lr: 0.1\n", "optimiser"), ("perf:\n  compiel: true\n", "compiel"),
                                       ("seeed: 3\n", "seeed")])
def test_a_misspelt_key_in_an_experiment_file_names_the_file(tmp_path, body, key):
    message = refused(experiment(tmp_path, body), rf"\b{key}\b")
    assert "experiment=evil" in message


def test_every_settings_mapping_refuses_an_unknown_key():
    """Discovered from the composed config: every top-level mapping without a _target_."""
    from tunelab.config.compose import as_hydra_job, compose_run

    with as_hydra_job(compose_run(SMOKE)) as cfg:
        mappings = [str(k) for k in cfg if OmegaConf.is_dict(cfg._get_node(k)) and "_target_" not in cfg[k]]
    assert {"logger", "paths", "perf", "retention", "module"} <= set(mappings)
    for key in mappings:
        refused([f"+{key}.zz_not_a_setting=1"], r"zz_not_a_setting")
