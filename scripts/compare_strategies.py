#!/usr/bin/env python
"""Run every freezing strategy on the same data and budget, then tabulate them from MLflow.

    .venv/bin/python scripts/compare_strategies.py                 # run the sweep, print the table
    .venv/bin/python scripts/compare_strategies.py --no-run        # only re-read the finished runs
    .venv/bin/python scripts/compare_strategies.py --strategies full,bitfit trainer.max_epochs=3

The sweep is one ``tunelab-train -m strategy=...`` multirun into the MLflow experiment
``strategy_compare``; the table is read back from MLflow (the latest run of each strategy),
never from log files. Extra arguments are Hydra overrides applied to every run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["full", "linear_probe", "freeze_unfreeze", "milestones", "gradual", "lp_ft", "bitfit", "regex", "lora"]
EXPERIMENT = "strategy_compare"


def run_sweep(strategies: list[str], overrides: list[str]) -> None:
    command = [str(ROOT / ".venv" / "bin" / "tunelab-train"), "-m", f"strategy={','.join(strategies)}",
               f"logger.experiment_name={EXPERIMENT}", "run_name=${hydra:runtime.choices.strategy}", *overrides]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def table(strategies: list[str], tracking_uri: str) -> str:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        sys.exit(f"no experiment {EXPERIMENT!r} in {tracking_uri}: run without --no-run first")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    latest = {}
    for run in runs:
        latest.setdefault(run.info.run_name, run)
    rows = ["| strategy | trainable params (last stage) | val/acc (best) | test/acc | test/f1 | train minutes |",
            "|---|---|---|---|---|---|"]
    stage_tables = []
    for name in strategies:
        run = latest.get(name)
        if run is None:
            rows.append(f"| {name} | (no finished run) | | | | |")
            continue
        text = Path(client.download_artifacts(run.info.run_id, "stage_table.txt")).read_text()
        trainable = text.splitlines()[-1 if not text.splitlines()[-1].startswith("*") else -2].split()[-2:]
        m = run.data.metrics
        rows.append(f"| {name} | {' '.join(trainable)} | {m.get('val/acc', float('nan')):.4f} | "
                    f"{m.get('test/acc', float('nan')):.4f} | {m.get('test/f1', float('nan')):.4f} | "
                    f"{m.get('time/fit_seconds', float('nan')) / 60:.1f} |")
        stage_tables.append(f"### {name}\n\n```\n{text}\n```")
    return "\n".join(rows) + "\n\n" + "\n\n".join(stage_tables) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated strategy choices")
    parser.add_argument("--no-run", action="store_true", help="only read finished runs from MLflow")
    parser.add_argument("--out", type=Path, help="also write the Markdown here")
    args, overrides = parser.parse_known_args()
    strategies = args.strategies.split(",")
    if not args.no_run:
        run_sweep(strategies, overrides)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'outputs' / 'mlflow.db'}"
    markdown = table(strategies, uri)
    print(markdown)
    if args.out:
        args.out.write_text(markdown)


if __name__ == "__main__":
    main()
