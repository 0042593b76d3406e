"""Fair arms: each arm of an experiment at its own tuned setting, then over several seeds.

An arm is what a claim compares (a strategy, a scheduler...). For every arm, scripts/experiments.py
runs two tunelab sweeps, both ordinary MLflow sweeps (a parent run and its trials):

1. the search: ``experiments/<part>_search.yaml`` (Optuna, the same trial budget and LR range for
   every arm, at a seed that is not one of the evaluation seeds) plus the arm's own extra searched
   keys (its LR multiplier, L2-SP's alpha...);
2. the seeds: ``experiments/<part>.yaml`` at the search's best setting, over seeds 1..5.

``<part>`` is the experiment's name, or the arm's own pair of files when its recipe differs (the
text arms of pretrained_vs_scratch).

Both carry the tag ``arm=<arm>``; the report reads each arm's latest search and latest seeds back
from MLflow and compares arms paired by seed.
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev

ARM_TAG = "arm"


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...]  # what makes the arm, e.g. ("strategy=full_l2sp",)
    searched: tuple[str, ...] = ()  # searched besides optimizer.lr, e.g. ("regularizer.alpha=tag(log, interval(1e-3, 1))",)
    part: str | None = None  # its search and seeds files, when not the experiment's: experiments/<part>[_search].yaml

    @property
    def searched_keys(self) -> list[str]:
        return ["optimizer.lr", *(s.partition("=")[0] for s in self.searched)]


def train(root: Path, part: str, arm: Arm, extra: list[str]) -> None:
    command = [str(root / ".venv" / "bin" / "tunelab-train"), f"experiment={part}", *arm.overrides,
               f"+logger.tags.{ARM_TAG}={arm.name}", *extra]
    print("+", " ".join(command), flush=True)
    if subprocess.run(command, cwd=root).returncode != 0:  # the trials that finished are still in MLflow
        print(f"warning: {' '.join(command)} failed; reporting the runs that finished", file=sys.stderr)


def chosen_setting(client, search_part: str, arm: Arm) -> list[str]:
    """The overrides of the best trial of the arm's latest search (its parent run's ``best.<key>`` tags)."""
    trials = latest_sweeps(client, search_part, arm.name)
    parent = client.get_run(trials[0].data.tags["mlflow.parentRunId"])
    best = {k: parent.data.tags.get(f"best.{k}") for k in arm.searched_keys}
    missing = [k for k, v in best.items() if v is None]
    if missing:
        sys.exit(f"the search of arm {arm.name} ({search_part}) has no best trial for {', '.join(missing)}: "
                 "every trial failed or was pruned; see its MLflow parent run")
    return [f"{k}={v}" for k, v in best.items()]


def run_arms(root: Path, client, name: str, arms: tuple[Arm, ...], overrides: list[str], stamp: str,
             trials: int | None = None, seeds: str | None = None) -> None:
    """Search, then seeds, arm by arm; ``trials`` and ``seeds`` replace the files' budget.
    Overrides of ``hydra.sweeper.*`` (the pruner, the sampler) go to the searches only."""
    for_search = [o for o in overrides if o.lstrip("+~").startswith("hydra.sweeper.")]
    common = [o for o in overrides if o not in for_search]
    for arm in arms:
        part = arm.part or name
        budget = [f"hydra.sweeper.n_trials={trials}"] if trials else []
        train(root, f"{part}_search", arm, [*arm.searched, f"hydra.sweeper.study_name={name}-{arm.name}-{stamp}",
                                            *budget, *for_search, *common])
        train(root, part, arm, [*chosen_setting(client, f"{part}_search", arm), *common,
                                *([f"seed={seeds}"] if seeds else [])])


def latest_sweeps(client, part: str, arm: str | None = None, required: bool = True) -> list:
    """The child runs of the newest sweep of ``part`` (per arm, when its runs carry arm tags),
    finished, failed and pruned alike, in start order. ``required``: none is an error."""
    ids = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.`tunelab.experiment` = '{part}'" + (f" and tags.`{ARM_TAG}` = '{arm}'" if arm else "")
    runs = client.search_runs(ids, query, max_results=5000) if ids else []
    if not runs and not required:
        return []
    if not runs:
        sys.exit(f"no runs tagged tunelab.experiment={part} in {client.tracking_uri}: run without --no-run first")
    sweeps: dict[tuple[str, str], list] = {}
    for run in runs:
        sweeps.setdefault((run.data.tags.get(ARM_TAG, ""), run.data.tags.get("mlflow.parentRunId", "")), []).append(run)
    newest: dict[str, list] = {}
    for (arm_name, _), group in sweeps.items():
        started = min(r.info.start_time for r in group)
        if arm_name not in newest or started > min(r.info.start_time for r in newest[arm_name]):
            newest[arm_name] = group
    return sorted((r for group in newest.values() for r in group), key=lambda r: r.info.start_time)


@dataclass
class Paired:
    """Per-seed differences a - b over the seeds both arms finished."""
    diffs: list[float]

    @property
    def mean(self) -> float:
        return mean(self.diffs) if self.diffs else float("nan")

    @property
    def se(self) -> float:
        return stdev(self.diffs) / math.sqrt(len(self.diffs)) if len(self.diffs) > 1 else float("nan")


def paired(a: dict[str, float], b: dict[str, float]) -> Paired:
    """``a`` and ``b`` map seed -> value; NaN values (not measured) drop their seed."""
    seeds = [s for s in a if s in b and not (math.isnan(a[s]) or math.isnan(b[s]))]
    return Paired([a[s] - b[s] for s in seeds])
