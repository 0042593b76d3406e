"""experiments/: every override file composes, and scripts/experiments.py turns a real sweep's
MLflow runs into the table and plot it commits (shrunk to seconds with debug=smoke)."""

from __future__ import annotations

import math
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


def _tuned_run_and_report(tmp_path, name: str, *args: str) -> tuple[str, MlflowClient]:
    """scripts/experiments.py's search-then-seeds run of ``name`` (seeds 1, 2), shrunk by ``args``
    and debug=smoke, into a fresh store: (the written results.md, a client on the store)."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "experiments.py"), name, "--seeds", "1,2",
                           "--out", str(tmp_path), *args, "debug=smoke", f"paths.log_dir={tmp_path}",
                           "callbacks.last_checkpoint=null"],  # nothing resumes: half the disk (MiniLM's are 270 MB)
                          cwd=REPO, env={**os.environ, "MLFLOW_TRACKING_URI": store}, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return (tmp_path / name / "results.md").read_text(), MlflowClient(store)


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
def test_lr_and_schedule_report_reads_each_schedulers_search_and_seeds(tmp_path):
    written, client = _tuned_run_and_report(tmp_path, "lr_and_schedule", "data.image_size=32", "--arms", "constant,warmup_cosine",
                                            "--trials", "3", "hydra.sweeper.pruner.n_startup_trials=1",
                                            "hydra.sweeper.pruner.n_warmup_steps=0")
    for arm in ("constant", "warmup_cosine"):
        search = [r for r in _tagged(client, "lr_and_schedule_search") if r.data.tags.get("arm") == arm]
        assert len(search) == 3 and {r.data.params["choice.scheduler"] for r in search} == {arm}
        best = [max(m.value for m in client.get_metric_history(r.info.run_id, "val/acc")) for r in search
                if r.data.tags.get("tunelab.trial_state") != "PRUNED"]
        pruned = sum(r.data.tags.get("tunelab.trial_state") == "PRUNED" for r in search)
        row = next(line for line in written.splitlines() if line.startswith(f"| {arm} |"))
        assert f"{min(best):.3f} .. {max(best):.3f} ({pruned} pruned)" in row
        seeds = [r for r in _tagged(client, "lr_and_schedule") if r.data.tags.get("arm") == arm]
        assert sorted(r.data.params["seed"] for r in seeds) == ["1", "2"] and len({r.data.params["optimizer.lr"] for r in seeds}) == 1
    assert "| linear | (no search) |" in written and "Claim \"the LR matters more than the schedule\"" in written


def test_paired_comparison_cancels_the_luck_a_seed_gives_both_arms():
    from experiment_stats import Stat, compare_paired

    luck = {"1": 0.60, "2": 0.80, "3": 0.70, "4": 0.90}  # what each seed's data order gives any arm
    b = dict(luck)
    a = {s: v + d for (s, v), d in zip(luck.items(), (0.02, 0.03, 0.02, 0.03))}
    unpaired = [Stat(list(arm.values())) for arm in (a, b)]
    assert unpaired[0].mean - unpaired[1].mean < 2 * math.hypot(unpaired[0].se, unpaired[1].se)  # lost in seed spread
    sign, words = compare_paired(a, b, "a", "b", "acc")
    assert sign == 1 and "a - b = +0.025" in words and "4 seeds" in words
    assert compare_paired(a, b, "a", "b", "loss", higher_is_better=False)[0] == -1
    a["5"], b["4"] = 0.99, float("nan")  # unpaired and unmeasured seeds drop out
    assert "3 seeds" in compare_paired(a, b, "a", "b", "acc")[1]
    assert compare_paired({"1": 0.5}, {"1": 0.4}, "a", "b", "acc")[0] == 0


@pytest.mark.slow
def test_tuned_arms_search_then_run_their_seeds_at_the_chosen_setting(tmp_path):
    written, client = _tuned_run_and_report(tmp_path, "strategy_shootout", "data.image_size=32", "--arms", "full,lp_ft",
                                            "--trials", "2")
    for arm, knobs in {"full": ["optimizer.lr"], "lp_ft": ["optimizer.lr", "strategy.lr_mult"]}.items():
        search = [r for r in _tagged(client, "strategy_shootout_search") if r.data.tags.get("arm") == arm]
        seeds = [r for r in _tagged(client, "strategy_shootout") if r.data.tags.get("arm") == arm]
        assert len(search) == 2 and len({r.data.tags["mlflow.parentRunId"] for r in search}) == 1
        assert {r.data.params["seed"] for r in search} == {"0"}  # tuned on a seed that is not evaluated
        parent = client.get_run(search[0].data.tags["mlflow.parentRunId"]).data.tags
        best = next(r for r in search if r.info.run_id == parent["tunelab.best_run_id"])
        for knob in knobs:  # the seeds run exactly the best trial's setting
            assert {float(r.data.params[knob]) for r in seeds} == {float(best.data.tags[f"sweep.{knob}"])}
        assert sorted(r.data.params["seed"] for r in seeds) == ["1", "2"]
        row = next(line for line in written.splitlines() if line.startswith(f"| {arm} |"))
        assert f"lr {float(parent['best.optimizer.lr']):.2g}" in row and row.rstrip(" |").endswith("2")
    natural = {arm: {r.data.params["seed"]: r.data.metrics["ood/sklearn_digits/acc"]
                     for r in _tagged(client, "strategy_shootout") if r.data.tags.get("arm") == arm} for arm in ("full", "lp_ft")}
    diff = mean(natural["lp_ft"][s] - natural["full"][s] for s in ("1", "2"))
    shown = written.split("on the natural shift")[1].split("\n")[0]
    assert f"lp_ft - full = {diff:+.3f}" in shown
    assert "| linear_probe | (no search) |" in written  # arms not run are shown as missing, not invented


@pytest.mark.slow
def test_pretrained_vs_scratch_tunes_each_init_and_pairs_them_by_seed_across_image_and_text_files(tmp_path):
    arms = {"mnist-100-pretrained": "pretrained_vs_scratch", "mnist-100-scratch": "pretrained_vs_scratch",
            "text-pretrained": "pretrained_vs_scratch_text", "text-scratch": "pretrained_vs_scratch_text"}
    written, client = _tuned_run_and_report(tmp_path, "pretrained_vs_scratch", "--arms", ",".join(arms), "--trials", "2")
    test_acc = {}
    for arm, part in arms.items():
        search = [r for r in _tagged(client, f"{part}_search") if r.data.tags.get("arm") == arm]
        seeds = [r for r in _tagged(client, part) if r.data.tags.get("arm") == arm]
        assert len(search) == 2 and sorted(r.data.params["seed"] for r in seeds) == ["1", "2"]
        assert {r.data.params["model.pretrained"].lower() for r in search + seeds} == {str(arm.endswith("pretrained")).lower()}
        parent = client.get_run(search[0].data.tags["mlflow.parentRunId"]).data.tags
        assert {float(r.data.params["optimizer.lr"]) for r in seeds} == {float(parent["best.optimizer.lr"])}
        test_acc[arm] = {r.data.params["seed"]: r.data.metrics["test/acc"] for r in seeds}
    for cell, label in (("mnist-100", "MNIST-5k, 100 images"), ("text", "drug reviews")):
        gap = mean(test_acc[f"{cell}-pretrained"][s] - test_acc[f"{cell}-scratch"][s] for s in ("1", "2"))
        row = next(line for line in written.splitlines() if label in line)
        cells = [c.strip() for c in row.strip(" |").split("|")]
        assert cells[5].startswith(f"{gap:+.3f} (") and cells[6] == "4"  # the paired gap, over both inits' 2 seeds
    assert "| EfficientNet-Lite0, Fashion-MNIST, 500 images | (no run) | (no search) |" in written
    assert "Claim \"the gap is largest when data is scarce\"" in written  # 1,000 images not run: said, not invented
    assert "fewer than 2 seeds finished both" in written.split("data is scarce")[1]


@pytest.mark.parametrize("args, message", [
    (["pretrained_vs_scratch", "--arms", "text-pretrained,text-bogus"], "no arm text-bogus in pretrained_vs_scratch"),
    (["few_shot", "--trials", "0"], "--trials must be at least 1"),
    (["strategy_shootout", "--arms", "full,bogus"], "no arm bogus in strategy_shootout (arms: full, linear_probe"),
])
def test_bad_experiment_options_fail_in_one_line_before_any_run(tmp_path, args, message):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "experiments.py"), *args, "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr.splitlines()[-1], done.stderr
    assert not list(tmp_path.iterdir())  # no store, no report
