#!/usr/bin/env python
"""Run a fine-tuning experiment from experiments/, then tabulate and plot it from MLflow.

    .venv/bin/python scripts/experiments.py strategy_shootout            # run the sweep, write the report
    .venv/bin/python scripts/experiments.py strategy_shootout --no-run   # only re-read the finished runs
    .venv/bin/python scripts/experiments.py few_shot trainer.max_epochs=2  # extra overrides for every run
    .venv/bin/python scripts/experiments.py strategy_shootout --arms full,lp_ft --trials 3 --seeds 1,2

Each experiment compares arms (strategies, schedulers, inits...). Per arm it runs a search
(experiments/<part>_search.yaml) and then seeds at the setting the search chose
(experiments/<part>.yaml), each as ``tunelab-train experiment=<part>`` (scripts/experiment_tuning.py).
Their runs carry the tags ``tunelab.experiment=<part>`` and ``arm=<arm>``.
The report reads the latest sweep of every part (and arm) back from MLflow (never from log files) and
writes experiments/<name>/results.md and experiments/<name>/<name>.png. results.md is exactly
what this script prints, including the notes that hold each claim against the numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from experiment_reports import REPORTS, Experiment  # noqa: E402
from experiment_tuning import latest_sweeps, run_arms  # noqa: E402
import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def header(experiment: Experiment, runs: dict[str, list], tracking_uri: str) -> str:
    count = sum(len(r) for r in runs.values())
    every = [r for group in runs.values() for r in group]
    started = min(r.info.start_time for r in every) / 1000
    busy = sum(((r.info.end_time or r.info.start_time) - r.info.start_time) / 1000 for r in every)
    when = datetime.fromtimestamp(started, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commits = sorted({r.data.tags.get("mlflow.source.git.commit", "")[:7] or "unknown" for r in every})
    return (f"# {experiment.title}\n\n"
            f"Command: `.venv/bin/python scripts/experiments.py {experiment.name}` "
            f"(override files: {', '.join(f'`experiments/{p}.yaml`' for p in experiment.parts)}).\n"
            f"{count} runs read back from MLflow (`{tracking_uri}`), started {when}, "
            f"{busy / 60:.0f} min of run time (summed over the runs) on {os.cpu_count()} CPU cores "
            f"({platform.processor() or platform.machine()}), trained at tunelab commit {', '.join(commits)}.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="experiments: " + ", ".join(REPORTS))
    parser.add_argument("name", choices=sorted(REPORTS), help="the experiment to run and report")
    parser.add_argument("--no-run", action="store_true", help="only read the finished runs from MLflow")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments",
                        help="write <out>/<name>/results.md and <name>.png (default: experiments/)")
    parser.add_argument("--arms", help="only these arms, comma-separated (default: all)")
    parser.add_argument("--trials", type=int, help="search trials per arm (default: the search file's)")
    parser.add_argument("--seeds", help="the seeds, e.g. 1,2 (default: the file's)")
    args, overrides = parser.parse_known_args()
    experiment = REPORTS[args.name]
    if args.trials is not None and args.trials < 1:
        parser.error(f"--trials must be at least 1, got {args.trials}")
    arms = [a for a in experiment.arms if not args.arms or a.name in args.arms.split(",")]
    unknown = set(args.arms.split(",")) - {a.name for a in arms} if args.arms else set()
    if unknown:
        parser.error(f"--arms: no arm {', '.join(sorted(unknown))} in {args.name} "
                     f"(arms: {', '.join(a.name for a in experiment.arms)})")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'outputs' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)  # the reports read metric histories from the same store
    client = MlflowClient(uri)
    if not args.no_run:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")  # a fresh Optuna study per arm and run
        run_arms(ROOT, client, experiment.name, tuple(arms), overrides, stamp, args.trials, args.seeds)
    # a search part may be missing: its seeds were run by hand (tunelab-train experiment=<name> ...)
    runs = {part: latest_sweeps(client, part, required=not part.endswith("_search")) for part in experiment.parts}
    folder = args.out / experiment.name
    folder.mkdir(parents=True, exist_ok=True)
    body = experiment.report(runs, folder / f"{experiment.name}.png")
    markdown = header(experiment, runs, uri) + "\n" + body + f"\n![{experiment.name}]({experiment.name}.png)\n"
    print(markdown)
    (folder / "results.md").write_text(markdown)
    print(f"wrote {folder / 'results.md'} and {folder / (experiment.name + '.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
