"""experiments/: every override file composes, and scripts/experiments.py turns a real sweep's
MLflow runs into the table and plot it commits (shrunk to seconds with debug=smoke)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from statistics import mean

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO
from helpers.cli_inprocess import run_train

sys.path.insert(0, str(REPO / "scripts"))
from experiment_reports import REPORTS  # noqa: E402

TRAIN = str(REPO / ".venv" / "bin" / "tunelab-train")


def _sweep_and_report(tmp_path, name: str, overrides: list[str]) -> tuple[str, MlflowClient]:
    """Run experiment ``name`` shrunk by ``overrides`` into a fresh store, then its report:
    (the written results.md, a client on the store)."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    sweep = [TRAIN, f"experiment={name}", "debug=smoke", "data.image_size=32", f"paths.log_dir={tmp_path}", *overrides]
    done = subprocess.run(sweep, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = subprocess.run([sys.executable, str(REPO / "scripts" / "experiments.py"), name, "--no-run",
                             "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    written = (tmp_path / name / "results.md").read_text()
    assert report.stdout.strip() == written.strip()  # the committed table is what the script printed
    assert (tmp_path / name / f"{name}.png").stat().st_size > 10_000
    return written, MlflowClient(store)


def _tagged(client: MlflowClient, part: str) -> list:
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [r for r in runs if r.data.tags.get("tunelab.experiment") == part]


def test_every_part_of_every_experiment_is_an_override_file_with_its_command_in_the_header():
    for experiment in REPORTS.values():
        for part in experiment.parts:
            text = (REPO / "experiments" / f"{part}.yaml").read_text()
            assert f"scripts/experiments.py {experiment.name}" in text, part
            assert f"tunelab.experiment: {part}" in text, f"{part}: its runs must carry the tag the report reads"


@pytest.mark.parametrize("part", [p for e in REPORTS.values() for p in e.parts])
def test_experiment_files_compose_to_a_sweep(part, tmp_path):
    shown = run_train(tmp_path, f"experiment={part}", "--cfg", "hydra")  # tunelab-train's main(), in this process
    assert shown.returncode == 0, shown.stderr
    assert "mode: MULTIRUN" in shown.stdout and "params:" in shown.stdout


@pytest.mark.slow
def test_report_reads_the_sweep_back_from_mlflow_and_writes_table_and_plot(tmp_path):
    written, client = _sweep_and_report(tmp_path, "few_shot", ["trainer.max_epochs=4", "data.samples_per_class=1,2",
                                                               "strategy=linear_probe,lp_ft", "seed=1,2"])
    assert "8 runs read back from MLflow" in written

    # every cell is the mean of the matching runs' test/acc in the store
    children = _tagged(client, "few_shot")
    assert len(children) == 8 and all(r.info.status == "FINISHED" for r in children)
    for shots in (1, 2):
        row = next(line for line in written.splitlines() if line.startswith(f"| {shots} ({shots * 10} images)"))
        cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
        for strategy, cell in zip(["linear_probe", "full", "lp_ft"], cells[1:]):
            accs = [r.data.metrics["test/acc"] for r in children
                    if r.data.tags["sweep.strategy"] == strategy and r.data.tags["sweep.data.samples_per_class"] == str(shots)]
            if strategy == "full":
                assert not accs and cell == "(no run)"
            else:
                shown_mean = float(re.match(r"([\d.]+) ±", cell).group(1))
                assert len(accs) == 2 and abs(shown_mean - mean(accs)) < 1e-3
    assert "Claim \"with the fewest labels a linear probe is the safe choice\"" in written


def test_report_without_runs_says_how_to_get_them(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}"}
    report = subprocess.run([sys.executable, str(REPO / "scripts" / "experiments.py"), "few_shot", "--no-run",
                             "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True)
    assert report.returncode != 0 and "run without --no-run first" in report.stderr
    assert not (tmp_path / "few_shot" / "results.md").exists()


@pytest.mark.slow
def test_lr_and_schedule_report_counts_pruned_epochs_from_the_runs(tmp_path):
    written, client = _sweep_and_report(tmp_path, "lr_and_schedule", [
        "trainer.max_epochs=3", "hydra.sweeper.n_trials=5", "hydra.sweeper.pruner.n_startup_trials=1",
        "hydra.sweeper.pruner.n_warmup_steps=0"])
    runs = _tagged(client, "lr_and_schedule")
    assert len(runs) == 5
    epochs = sum(len(client.get_metric_history(r.info.run_id, "val/acc")) for r in runs)
    pruned = sum(r.data.tags.get("tunelab.trial_state") == "PRUNED" for r in runs)
    assert f"{pruned} pruned by the median pruner" in written
    assert f"**Pruning**: {epochs} of 15 epochs trained ({15 - epochs} saved" in written
    complete = [r for r in runs if r.info.status == "FINISHED"]
    assert all(len(client.get_metric_history(r.info.run_id, "val/acc")) == 3 for r in complete)
    rows = [line for line in written.splitlines() if re.match(r"\| \d+ \| \d", line)]
    assert len(rows) == 5 and all(row.split("|")[3].strip() in {"warmup_cosine", "constant", "linear", "one_cycle"} for row in rows)
    best = max(max(m.value for m in client.get_metric_history(r.info.run_id, "val/acc")) for r in runs)
    assert rows[0].split("|")[5].strip() == f"{best:.3f}"  # ranked by each trial's best epoch, not its last
    assert f"val acc {best:.3f}" in written.split("**Best**")[1]
