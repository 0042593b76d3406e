"""Config groups added from a user's own folder (``hydra.searchpath``), with no edit to tunelab.

Two kinds (docs/extending.md): a group that fits an extension point the engine already has is
YAML only (an early-stopping callback); one that fills a FineTuneModule extension point (a loss)
is a Python function plus its YAML. Both are checked before any run exists, against the user's
own signature, exactly like a shipped group.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli
from helpers.runs import IMAGE, nothing_written

from tunelab.errors import TunelabError

LOSS_PY = '''\
from typing import Annotated

import torch.nn.functional as F

from tunelab.config.settings import number

CALLS = []


def smoothed_ce(out, y, smoothing: Annotated[float, number(0, 1, high_open=True)] = 0.1):
    CALLS.append(smoothing)
    return F.cross_entropy(out, y, label_smoothing=smoothing)
'''
LOSS_YAML = "_target_: my_losses.smoothed_ce\n_partial_: true\nsmoothing: 0.2\n"
EARLY_STOP_YAML = """# @package callbacks.early_stop
_target_: lightning.pytorch.callbacks.EarlyStopping
monitor: ${objective}
mode: ${objective_mode}
patience: 1
"""


def user_folder(tmp_path: Path) -> Path:
    user = tmp_path / "user"
    (user / "conf" / "loss").mkdir(parents=True)
    (user / "conf" / "loss" / "smoothed.yaml").write_text(LOSS_YAML)
    (user / "conf" / "early_stop").mkdir()
    (user / "conf" / "early_stop" / "patient.yaml").write_text(EARLY_STOP_YAML)
    (user / "my_losses.py").write_text(LOSS_PY)
    return user


def user_args(user: Path) -> list[str]:
    return [f"hydra.searchpath=[file://{user / 'conf'}]", "loss=smoothed", "+early_stop=patient"]


BAD = [  # each refused in one line, before anything is read or built
    (["+loss.smoothin=0.2"], r"^loss\.smoothin is not a setting of my_losses\.smoothed_ce \(it takes smoothing\)"),
    (["loss.smoothing=2"], r"^loss\.smoothing must be in \[0, 1\), got 2\.$"),  # the user's own annotation
    (["+callbacks.early_stop.patiense=3"],
     r"^callbacks\.early_stop\.patiense is not a setting of lightning\.pytorch\.callbacks\.EarlyStopping"),
]


@pytest.fixture
def user(tmp_path, monkeypatch) -> Path:
    folder = user_folder(tmp_path)
    monkeypatch.setenv("TUNELAB_ALLOWED_TARGETS", "my_losses")  # the environment allows it, never a config
    monkeypatch.syspath_prepend(str(folder))
    return folder


def test_user_groups_are_checked_and_built_in_process(user):
    from tunelab.engine.build import build_parts
    from tunelab.config.compose import as_hydra_job, compose_run
    from tunelab.engine.plan import check_command

    report = check_command(["debug=smoke", *IMAGE, *user_args(user)], deep=True)
    assert "loss=smoothed" in report and "early_stop=patient" in report
    cfg = compose_run(["debug=smoke", *IMAGE, *user_args(user)])
    with as_hydra_job(cfg):
        module = build_parts(cfg).module
    import my_losses

    assert module.loss_fn.func is my_losses.smoothed_ce and module.loss_fn.keywords == {"smoothing": 0.2}
    assert cfg.callbacks.early_stop.patience == 1
    for extra, pattern in BAD:
        with pytest.raises(TunelabError, match=pattern):
            check_command(["debug=smoke", *IMAGE, *user_args(user), *extra], deep=False)


def test_a_user_target_needs_the_environment_to_allow_it(user, monkeypatch):
    from tunelab.engine.plan import check_command

    monkeypatch.delenv("TUNELAB_ALLOWED_TARGETS")
    with pytest.raises(TunelabError, match=r"loss.*my_losses\.smoothed_ce.*TUNELAB_ALLOWED_TARGETS=my_losses"):
        check_command(["debug=smoke", *IMAGE, *user_args(user)], deep=False)


def test_a_group_nothing_reads_is_refused(user):
    """A user group that fills no extension point would be silently ignored: refused instead."""
    from tunelab.engine.plan import check_command

    (user / "conf" / "lossy").mkdir()
    (user / "conf" / "lossy" / "a.yaml").write_text(LOSS_YAML)
    with pytest.raises(TunelabError, match=r"top-level key 'lossy' is not a tunelab setting"):
        check_command(["debug=smoke", *IMAGE, f"hydra.searchpath=[file://{user / 'conf'}]", "+lossy=a"], deep=False)


@pytest.mark.slow
def test_user_groups_train_from_the_command_line(tmp_path):
    """The real CLI: the user's loss trains the run and its choice is recorded; each bad setting
    exits 2 with one line and writes nothing."""
    user = user_folder(tmp_path)
    env = {"TUNELAB_ALLOWED_TARGETS": "my_losses", "PYTHONPATH": str(user)}
    for folder in ("ok", *(f"bad{i}" for i in range(len(BAD)))):
        (tmp_path / folder).mkdir()
    ok = run_cli(tmp_path / "ok", "debug=smoke", *IMAGE, *user_args(user), env=env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    (store,) = (tmp_path / "ok").rglob("mlflow.db")
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params.get("loss.smoothing") == "0.2", sorted(run.data.params)[:40]
    for i, (extra, pattern) in enumerate(BAD):
        bad = run_cli(tmp_path / f"bad{i}", "debug=smoke", *IMAGE, *user_args(user), *extra, env=env)
        errors = [line for line in bad.stderr.splitlines() if line.startswith("tunelab-train: error: ")]
        assert bad.returncode == 2 and len(errors) == 1, bad.stderr[-3000:]
        import re

        assert re.search(pattern, errors[0].removeprefix("tunelab-train: error: ")), errors[0]
        nothing_written(tmp_path / f"bad{i}")
