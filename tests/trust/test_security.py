"""Issue 10, security: the promises tunelab makes about untrusted input, each shown by an attack
that would leave a trace if it worked.

1. a checkpoint that runs code when unpickled is refused on every load path (resume, eval,
   export, init_from, model.checkpoint), with one clear error, and its code never runs;
2. the checkpoints tunelab writes hold plain containers, so they load with weights_only=True;
3. ``_target_``s outside the allow-list are refused, from files and from the command line;
4. secrets in the environment end up in no log, parameter, tag, artifact or output file;
5. the MLflow UI binds to loopback unless --allow-remote is given;
6. mlflow is pinned at >= 3.10.

"""

from __future__ import annotations

import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import PROBES, REPO, VENV_BIN, compose_cfg
from helpers.runs import SECRETS, TINY, error_lines, mlflow_runs, plant_malicious_checkpoint, train_cli
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, ListConfig, OmegaConf

from tunelab.config import build, check_targets
from tunelab.config.targets import SUMMARY
from tunelab.errors import TunelabError

def run_tool(tool: str, home: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A tunelab console script (tunelab-eval, tunelab-export, ...) as a user runs it, in ``home``."""
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    environment.update({"TUNELAB_HOME": str(home), **SECRETS, **(env or {})})
    return subprocess.run([str(VENV_BIN / tool), *args], cwd=home, env=environment, capture_output=True, text=True,
                          timeout=600, check=False)


def malicious_run_folder(trained_run, root: Path, marker: Path) -> Path:
    """A copy of the trained run's folder (config + meta, as tunelab-eval/export need them) whose
    checkpoints/ holds one checkpoint: the real last.ckpt with a code-running payload added."""
    folder = root / "runs" / "downloaded"
    folder.mkdir(parents=True)
    for name in ("resolved_config.yaml", "model_meta.json"):
        (folder / name).write_bytes((trained_run.folder / name).read_bytes())
    return plant_malicious_checkpoint(folder / "checkpoints" / "epoch01.ckpt", marker, like=trained_run.last).resolve()


# -- 1. malicious pickle checkpoints ---------------------------------------------------------------


def test_the_crafted_checkpoint_really_runs_code_when_unpickled(tmp_path):
    """Control for the refusals below: the planted file is live, so a loader that unpickled it
    (weights_only=False) would run the attacker's command. Without this they could pass vacuously."""
    marker = tmp_path / "pwned"
    for fmt in ("zip", "legacy", "pickle"):
        path = plant_malicious_checkpoint(tmp_path / f"{fmt}.ckpt", marker, fmt=fmt)
        if fmt == "pickle":
            pickle.loads(path.read_bytes())
        else:
            torch.load(path, weights_only=False)
        assert marker.exists(), fmt
        marker.unlink()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 5")
@pytest.mark.parametrize("fmt", ["zip", "legacy", "pickle"])
def test_malicious_checkpoint_is_refused_in_every_file_format(tmp_path, fmt):
    """The two loaders every path goes through (a Lightning checkpoint's state dict, and
    model.checkpoint's state dict) refuse the payload in torch's zip and legacy formats and as a
    bare pickle, with a TunelabError that names the file; the payload never runs."""
    from tunelab.adapters.weights import read_state_dict
    from tunelab.engine.trained import lightning_state

    marker = tmp_path / "pwned"
    path = plant_malicious_checkpoint(tmp_path / "evil.ckpt", marker, fmt=fmt)
    for load in (lambda: lightning_state(path, "checkpoint"), lambda: read_state_dict(path)):
        with pytest.raises(TunelabError) as caught:
            load()
        message = str(caught.value)
        assert str(path) in message and "\n" not in message
        assert "weights_only=True" in message and "trusted sources" in message
        assert "weights_only` set to `False`" not in message  # torch's advice to load it unsafely
        if fmt != "pickle":  # torch names the blocked callable; a bare pickle is refused earlier
            assert "refused" in message and "Python objects beyond tensors (posix.system)" in message
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("path_name", ["resume", "eval", "export", "init_from", "model.checkpoint"])
def test_malicious_checkpoint_is_refused_on_every_load_path(trained_run, tmp_path, path_name):
    """Each way a user hands tunelab a checkpoint, given one that runs ``touch`` when unpickled:
    the command fails, says the file was refused as unsafe (one line naming it), and the marker
    file never appears."""
    marker = tmp_path / "pwned"
    evil = malicious_run_folder(trained_run, tmp_path, marker)
    home = tmp_path / "home"
    home.mkdir()
    if path_name == "resume":
        proc = train_cli(home, f"ckpt_path={evil}")
    elif path_name == "eval":
        proc = run_tool("tunelab-eval", home, str(evil), "--no-log")
    elif path_name == "export":
        proc = run_tool("tunelab-export", home, str(evil), "--out", str(tmp_path / "exported"))
    elif path_name == "init_from":
        proc = train_cli(home, f"init_from={evil}")
    else:
        proc = train_cli(home, f"model.checkpoint={evil}")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert not marker.exists(), f"{path_name} ran the checkpoint's code"
    assert "posix.system" in output, output[-3000:]  # refused for the payload, not for another reason
    assert not (tmp_path / "exported" / "model.onnx").exists()
    assert all(r.info.status != "FINISHED" for r in mlflow_runs(home))
    assert "Traceback" not in proc.stderr and "weights_only` set to `False`" not in proc.stderr
    (line,) = error_lines(proc)
    assert str(evil) in line and "refused" in line and "Python objects beyond tensors" in line
    assert "trusted sources" in line


@pytest.mark.slow
def test_legitimate_checkpoints_still_load(trained_run, tmp_path):
    """The refusals are specific: the checkpoint a real run wrote resumes, evaluates, exports and
    seeds init_from, and a plain state dict works as model.checkpoint."""
    state = torch.load(trained_run.last, map_location="cpu", weights_only=True)["state_dict"]
    plain = tmp_path / "weights.pt"
    torch.save({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}, plain)
    home = tmp_path / "home"
    proc = train_cli(home, f"ckpt_path={trained_run.last}", f"init_from={trained_run.last}", f"model.checkpoint={plain}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {trained_run.last}" in proc.stdout + proc.stderr
    assert f"({plain}, pretrained head kept" in proc.stdout  # the model line names its weights
    (run,) = mlflow_runs(home)
    assert run.info.status == "FINISHED" and run.data.tags["tunelab.init_from"] == str(trained_run.last)

    evaluated = run_tool("tunelab-eval", tmp_path, str(trained_run.last), "--no-log")
    assert evaluated.returncode == 0 and "test/acc" in evaluated.stdout, evaluated.stderr[-3000:]
    exported = run_tool("tunelab-export", tmp_path, str(trained_run.last), "--out", str(tmp_path / "exported"),
                        "--format", "torchscript")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (tmp_path / "exported" / "model.ts").is_file()


# -- 2. checkpoints hold plain containers ------------------------------------------------------------


def _plain(value, where: str = "checkpoint") -> None:
    """Tensors, numbers, strings and the builtin containers only, all the way down."""
    assert not isinstance(value, (DictConfig, ListConfig)), where
    if isinstance(value, dict):
        for key, item in value.items():
            _plain(key, where)
            _plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _plain(item, f"{where}[{i}]")
    else:
        assert value is None or isinstance(value, (torch.Tensor, bool, int, float, str, bytes)), \
            f"{where} is a {type(value).__module__}.{type(value).__qualname__}"


@pytest.mark.slow
def test_checkpoints_a_run_writes_load_with_weights_only(trained_run, tmp_path):
    """Every checkpoint a real run wrote (best, last, and the copy logged to MLflow) loads with
    ``torch.load(weights_only=True)``, and any hyper-parameters in them are plain containers, not
    OmegaConf objects (which weights_only refuses)."""
    client = MlflowClient(f"sqlite:///{trained_run.home / 'outputs' / 'mlflow.db'}")
    (run,) = mlflow_runs(trained_run.home)
    logged = Path(client.download_artifacts(run.info.run_id, "checkpoints", str(tmp_path)))
    paths = [trained_run.best, trained_run.last, *sorted(logged.glob("*.ckpt"))]
    assert len(paths) == 3
    for path in paths:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert checkpoint["state_dict"], path
        _plain(checkpoint, path.name)
        assert isinstance(checkpoint.get("hyper_parameters", {}), dict)


# -- 3. the _target_ allow-list ------------------------------------------------------------------------


def _target_cases(conf: Path, marker: Path) -> dict[str, tuple[list[str], str, str]]:
    """name -> (tunelab-train arguments, the refused key, its target). The ``file`` cases write a
    config folder a user might have downloaded; the ``cli`` ones are typed overrides."""
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "evil.yaml").write_text(  # a model config's usual keys, and a payload
        f"_target_: os.system\ncommand: touch {marker}\narch: test_efficientnet\npretrained: false\n")
    (conf / "experiment").mkdir()
    (conf / "experiment" / "evil.yaml").write_text(
        "# @package _global_\noptimizer:\n  _target_: builtins.eval\n"
        f"  _args_: [\"__import__('pathlib').Path('{marker}').touch()\"]\n")
    (conf / "callbacks").mkdir()
    (conf / "callbacks" / "evil.yaml").write_text(f"evil:\n  _target_: subprocess.run\n  args: [touch, {marker}]\n")
    searchpath = f"hydra.searchpath=[file://{conf}]"
    return {
        "file-os.system": ([searchpath, "model=evil"], "model._target_", "os.system"),
        "file-builtins.eval": ([searchpath, "experiment=evil"], "optimizer._target_", "builtins.eval"),
        "file-subprocess.run": ([searchpath, "callbacks=evil"], "callbacks.evil._target_", "subprocess.run"),
        "cli-os.system": ([f'+callbacks.evil={{_target_: os.system, command: "touch {marker}"}}'],
                          "callbacks.evil._target_", "os.system"),
        "cli-builtins.eval": (["optimizer._target_=builtins.eval"], "optimizer._target_", "builtins.eval"),
        "cli-subprocess.run": ([f"+callbacks.evil={{_target_: subprocess.run, args: [touch, {marker}]}}"],
                               "callbacks.evil._target_", "subprocess.run"),
        # Hydra's own block-list lets pathlib through: only tunelab's allow-list stops this one
        "cli-pathlib.touch": ([(f"+callbacks.evil={{_target_: pathlib.Path.touch, "
                                f"_args_: [{{_target_: pathlib.Path, _args_: [{marker}]}}]}}")],
                              "callbacks.evil._target_", "pathlib.Path.touch"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["file-os.system", "file-builtins.eval", "file-subprocess.run", "cli-os.system",
                                  "cli-builtins.eval", "cli-subprocess.run", "cli-pathlib.touch"])
def test_targets_outside_the_allow_list_are_refused(tmp_path, case):
    """``_target_: os.system`` / ``builtins.eval`` / ``subprocess.run`` (and a target Hydra itself
    would build) from a config file or the command line: tunelab-train exits non-zero before any
    training, the command never runs, and the one error line names the key, the allowed prefixes
    and TUNELAB_ALLOWED_TARGETS."""
    marker = tmp_path / "pwned"
    args, key, target = _target_cases(tmp_path / "conf", marker)[case]
    home = tmp_path / "home"
    proc = train_cli(home, *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert not marker.exists()
    (line,) = error_lines(proc)
    assert f"{key}={target!r} is outside the allowed targets ({SUMMARY})" in line, line
    assert "TUNELAB_ALLOWED_TARGETS=" in line
    assert not list(home.glob("outputs/runs/*/checkpoints")), "training started"
    assert all(r.info.status == "FAILED" for r in mlflow_runs(home))


@pytest.mark.slow
def test_a_prefix_declared_in_tunelab_allowed_targets_is_built(tmp_path, monkeypatch):
    """The environment, not the config, grants more: with TUNELAB_ALLOWED_TARGETS=security_probe
    the user's callback (tests/helpers/security_probe.py) is built and runs; without it, it is refused;
    the declared prefix covers that module only, not names that merely start with it."""
    node = OmegaConf.create({"probe": {"_target_": "security_probe.TouchOnFitStart", "path": "x"}})
    monkeypatch.delenv("TUNELAB_ALLOWED_TARGETS", raising=False)
    with pytest.raises(TunelabError, match=r"callbacks\.probe\._target_=.*TUNELAB_ALLOWED_TARGETS=security_probe"):
        check_targets(node, "callbacks")
    monkeypatch.setenv("TUNELAB_ALLOWED_TARGETS", "mypkg, security_probe")
    check_targets(node, "callbacks")
    with pytest.raises(TunelabError):
        check_targets(OmegaConf.create({"_target_": "security_probe_evil.run"}), "callbacks.x")

    marker = tmp_path / "callback-ran"
    pythonpath = os.pathsep.join(p for p in (str(PROBES), os.environ.get("PYTHONPATH")) if p)
    proc = train_cli(tmp_path / "home", f"+callbacks.probe={{_target_: security_probe.TouchOnFitStart, path: {marker}}}",
                     env={"TUNELAB_ALLOWED_TARGETS": "security_probe", "PYTHONPATH": pythonpath})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists()


def test_allow_list_judges_what_a_target_resolves_to(tmp_path):
    """A target spelled under an allowed prefix but resolving elsewhere (tunelab.config imports
    pathlib.Path) must be refused too; otherwise a config writes files (e.g. a .pth in
    site-packages: code at the next Python start)."""
    marker = tmp_path / "pwned"
    node = OmegaConf.create({"_target_": "tunelab.config.Path.touch",
                             "_args_": [{"_target_": "tunelab.config.Path", "_args_": [str(marker)]}]})
    with pytest.raises(TunelabError, match="outside the allowed targets"):
        build(node, "callbacks.evil")
    assert not marker.exists()


def test_the_whole_config_is_checked_before_the_mlflow_run_starts(tmp_path, monkeypatch):
    """A refused callback leaves no MLflow run behind: the whole tree is checked before anything
    (data, model, tracking) starts."""
    from tunelab.cli.train import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_cfg(tmp_path, [*TINY[1:], "+callbacks.evil={_target_: os.system, command: 'true'}"])
    with pytest.raises(TunelabError, match=r"callbacks\.evil\._target_='os.system'"):
        train(cfg)
    assert mlflow_runs(tmp_path) == []


@pytest.mark.slow
def test_an_experiment_file_cannot_build_hydra_callbacks(tmp_path):
    """An experiment file that adds ``hydra.callbacks`` (built by Hydra, outside tunelab's
    ``build``) must not get its target run."""
    marker = tmp_path / "pwned"
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "evil.yaml").write_text(
        "# @package _global_\nhydra:\n  callbacks:\n    evil:\n      _target_: pathlib.Path.touch\n"
        f"      _args_:\n        - _target_: pathlib.Path\n          _args_: [{marker}]\n")
    proc = train_cli(tmp_path / "home", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=evil",
                     "optimizer.lr=-1")  # an invalid lr: fail fast once the job starts
    assert proc.returncode != 0
    assert not marker.exists(), "Hydra built the experiment file's hydra.callbacks target"


# -- 4. secrets never logged ---------------------------------------------------------------------------


@pytest.mark.slow
def test_secrets_in_the_environment_are_never_logged(trained_run, tmp_path):
    """The shared run trained with MLFLOW_TRACKING_TOKEN / _PASSWORD set: neither value is in
    its MLflow params, tags or artifacts (config.yaml included), the SQLite store itself, any
    file of its output folder (resolved_config.yaml, .hydra/*.yaml, the log) or its console."""
    client = MlflowClient(f"sqlite:///{trained_run.home / 'outputs' / 'mlflow.db'}")
    (run,) = mlflow_runs(trained_run.home)
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    texts = {"params": repr(run.data.params), "tags": repr(run.data.tags), "config.yaml artifact": Path(config).read_text(),
             "stdout": trained_run.proc.stdout, "stderr": trained_run.proc.stderr}
    files = [p for p in (trained_run.home / "outputs").rglob("*") if p.is_file()]
    names = {p.relative_to(trained_run.folder).as_posix() for p in files if trained_run.folder in p.parents}
    assert {"resolved_config.yaml", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml",
            "train.log"} <= names, names  # the scan below covers these
    assert any(p.name == "mlflow.db" for p in files)
    # the scan sees real content: the run's own output folder is written in its config
    assert str(trained_run.folder) in texts["config.yaml artifact"] and len(run.data.params) > 50
    for secret in (SECRETS["MLFLOW_TRACKING_TOKEN"], SECRETS["MLFLOW_TRACKING_PASSWORD"]):
        leaks = [name for name, text in texts.items() if secret in text]
        leaks += [str(p) for p in files if secret.encode() in p.read_bytes()]
        assert not leaks, f"{secret} leaked into {leaks}"


# -- 5. the UI binds to loopback --------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10"])
def test_ui_console_script_refuses_a_reachable_host_without_allow_remote(tmp_path, host):
    """tests/cli/test_ui.py covers the default 127.0.0.1 and the warning with --allow-remote in
    process; here the installed tunelab-ui itself exits non-zero for any non-loopback address
    (IPv6 and a LAN address included) and says how to opt in."""
    store = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{store}").search_experiments()
    proc = subprocess.run([str(VENV_BIN / "tunelab-ui"), "--store", str(store), "--host", host, "--port", "1"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    assert f"--host {host} would expose the runs" in proc.stderr and "--allow-remote" in proc.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_ui_accepts_loopback_names_without_warning(tmp_path, monkeypatch, capsys, host):
    """Loopback spelled any way is served without --allow-remote and without the warning."""
    from tunelab.cli import ui

    store = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{store}").search_experiments()
    launched = []
    monkeypatch.setattr(ui.os, "execv", lambda path, argv: launched.append(argv))
    ui.main(["--store", str(store), "--host", host])
    assert launched[-1][launched[-1].index("--host") + 1] == host
    assert "warning" not in capsys.readouterr().out


# -- 6. mlflow version ------------------------------------------------------------------------------------


def test_mlflow_is_pinned_at_3_10_or_later():
    """The installed mlflow is >= 3.10, and pyproject's requirement excludes anything older."""
    from importlib.metadata import version

    import tomllib
    from packaging.requirements import Requirement
    from packaging.version import Version

    assert Version(version("mlflow")) >= Version("3.10")
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (mlflow,) = [Requirement(d) for d in dependencies if Requirement(d).name == "mlflow"]
    assert not mlflow.specifier.contains("3.9.99") and not mlflow.specifier.contains("2.22.0")
    assert mlflow.specifier.contains("3.10.0") and mlflow.specifier.contains(version("mlflow"))


def test_a_password_in_the_tracking_uri_is_never_printed(tmp_path):
    """``MLFLOW_TRACKING_URI=http://user:password@host`` (basic auth): messages show ``user:***``."""
    from tunelab.ports import free_port

    proc = train_cli(tmp_path, env={"MLFLOW_TRACKING_URI": f"http://alice:pw-IN-URI-42@127.0.0.1:{free_port()}/"})
    assert proc.returncode == 2
    assert "pw-IN-URI-42" not in proc.stdout + proc.stderr
    (line,) = error_lines(proc)
    assert "http://alice:***@127.0.0.1:" in line and "is unreachable" in line
