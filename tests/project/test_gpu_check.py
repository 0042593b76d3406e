"""The prepared GPU check (scripts/gpu_check.sh) cannot rot: its CPU dry run runs every part here,
a part that fails or overruns is reported without stopping the others, and the wheelhouse it
installs on a GPU node pins the versions this environment runs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from importlib import metadata

import pytest

from conftest import REPO


def _gpu_check():
    sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_cpu_dry_run_runs_every_part_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "WHEELHOUSE": str(tmp_path / "no-wheels")}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out), "--device", "cpu", "--tiny"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    names = [p.name for p in _gpu_check().parts(_args(tmp_path))]
    assert list(report["parts"]) == names  # every part ran, in order
    assert {p["status"] for p in report["parts"].values()} == {"ok"}
    parts = report["parts"]
    assert parts["main_job"]["result"]["run_status"] == "FINISHED"
    assert 0 <= parts["main_job"]["result"]["test_acc"] <= 1
    assert all(rate > 0 for rate in parts["main_job"]["result"]["train_samples_per_s_by_epoch"])
    assert parts["loader_rate"]["result"]["loader_samples_per_s"] > 0
    assert parts["ddp_smoke"]["result"]["run_status"] == "FINISHED"
    assert parts["sweep"]["result"]["parent_status"] == ["FINISHED"]
    assert parts["sweep"]["result"]["child_status"] == ["FINISHED", "FINISHED"]
    assert parts["sweep"]["result"]["placement"]  # each job said where it ran
    results = {json.loads(p.read_text())["mode"] + "/" + json.loads(p.read_text())["model"]
               for p in (out / "results").glob("*.json")}
    assert {"eager/resnet18", "compiled/resnet18", "eager/vit_tiny_patch16_224", "eager/bert-tiny",
            "eager/efficientnet_lite0"} <= results
    markdown = (out / "gpu_check.md").read_text()
    assert "| model | device | mode |" in markdown and "| target | measured |" in markdown
    assert "training runs at" in markdown  # loading vs compute, from the main job and the loader
    assert (out / "logs.tar.gz").stat().st_size > 0


def _args(tmp_path, **changes):
    args = _gpu_check().argparse.Namespace(device="cpu", tiny=True, out=tmp_path / "out", work=tmp_path / "work")
    vars(args).update(changes)
    return args


def test_a_failing_or_overrunning_part_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    check = _gpu_check()
    python = sys.executable
    monkeypatch.setattr(check, "parts", lambda args: [
        check.Part("fails", 30, [python, "-c", "import sys; print('boom'); sys.exit(3)"]),
        check.Part("hangs", 1, [python, "-c", "import time; time.sleep(60)"]),
        check.Part("works", 30, [python, "-c", "print('fine')"]),
    ])
    started = time.perf_counter()
    assert check.main([str(tmp_path / "out"), "--device", "cpu"]) == 1
    assert time.perf_counter() - started < 30  # the hanging part was killed after its second
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["parts"]["fails"]["status"] == "failed (exit 3)"
    assert "boom" in report["parts"]["fails"]["log_tail"]
    assert report["parts"]["hangs"]["status"] == "timed out"
    assert report["parts"]["works"]["status"] == "ok"
    assert "1/3 parts ok: not fails, hangs" in capsys.readouterr().out
    assert "| works | ok |" in (tmp_path / "out" / "gpu_check.md").read_text()


def test_the_total_budget_skips_what_no_longer_fits(tmp_path, monkeypatch):
    check = _gpu_check()
    monkeypatch.setattr(check, "parts", lambda args: [
        check.Part("slow", 30, [sys.executable, "-c", "import time; time.sleep(60)"]),
        check.Part("late", 30, [sys.executable, "-c", "print('never')"]),
    ])
    assert check.main([str(tmp_path / "out"), "--device", "cpu", "--budget", "6"]) == 1
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["parts"]["slow"]["status"] == "timed out"
    assert report["parts"]["late"]["status"] == "skipped (total budget spent)"


def test_the_wheelhouse_pins_the_versions_this_environment_runs():
    """make_wheelhouse.sh's list is what a GPU node gets: a pin that drifted from the project's
    environment would test other code there than here."""
    script = (REPO / "scripts" / "make_wheelhouse.sh").read_text()
    pins = dict(re.findall(r"^\s*([A-Za-z0-9_.\-]+)==([0-9][^\s\"')]*)", script, flags=re.M))
    assert {"hydra-core", "omegaconf", "mlflow-skinny"} <= {name.lower() for name in pins}
    for name, version in pins.items():
        assert metadata.version(name) == version, f"{name}: wheelhouse pins {version}, the environment runs {metadata.version(name)}"


def test_an_unknown_part_name_is_one_line_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _gpu_check().main([str(tmp_path / "out"), "--device", "cpu", "--only", "main_job,mian_job"])
    assert exit_.value.code == 2
    assert "--only: no part named mian_job; the parts: bench_resnet50," in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was written


def test_without_a_gpu_the_gpu_run_says_so_and_writes_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="no CUDA GPU visible .*--device cpu --tiny"):
        _gpu_check().main([str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("part", ["main_job", "ddp_smoke", "sweep", "loader_rate", "step_profile"])
def test_a_part_that_left_no_result_is_reported_as_such(tmp_path, part):
    _gpu_check()  # puts scripts/ on the path
    from gpu_check_report import READERS, read_results

    assert part in READERS
    (tmp_path / "work" / "logs").mkdir(parents=True)
    (tmp_path / "work" / "logs" / f"{part}.log").write_text("Traceback: the part died\n")
    report = {"parts": {part: {"status": "failed (exit 1)"}}}
    read_results(part, report, _args(tmp_path))
    assert report["parts"][part]["result"]["error"] in ("no result line", f"LookupError: no MLflow run in "
                                                        f"{tmp_path / 'work' / part / 'outputs' / 'mlflow.db'}")


def test_the_step_profile_refuses_a_run_too_short_for_its_warm_up(monkeypatch, tmp_path):
    """The profile leaves its warm-up steps out; a run that ends before them has nothing to time."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from gpu_check_report import step_profile

    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    short = ["debug=smoke", "trainer=cpu", "strategy=full", "trainer.max_epochs=1", "++trainer.limit_train_batches=3",
             "model.arch=test_efficientnet", "model.pretrained=false", "data.image_size=32", "data.max_train_samples=64"]
    with pytest.raises(SystemExit, match=r"^step_profile: the run ended after 3 steps, before the 20 warm-up steps$"):
        step_profile(short, steps=5, warmup=20)
