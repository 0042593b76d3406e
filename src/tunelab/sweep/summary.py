"""A finished sweep read back from MLflow: its trials, the best one, a table and a plot."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from tunelab.tracking import tag_names
from tunelab.tracking.plots import figure, save

PRUNED = "PRUNED"  # tag tunelab.trial_state: an Optuna trial stopped early on purpose


@dataclass
class Trial:
    run_id: str
    name: str
    status: str  # FINISHED, FAILED, KILLED, RUNNING, or PRUNED (a KILLED run tagged so)
    params: dict[str, str]  # the job's overrides (params logged as sweep.<key>)
    value: float | None  # the objective metric, None when the trial never logged it
    seconds: float | None
    label: str = ""  # "trial 3" (Optuna) or "#3" (job number)
    start: int = 0

    def completed(self) -> bool:
        return self.status == "FINISHED" and self.value is not None and math.isfinite(self.value)


def collect(client: MlflowClient, experiment_id: str, parent_id: str, objective: str) -> list[Trial]:
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=50000)
    trials = []
    for run in runs:
        info, data = run.info, run.data
        status = PRUNED if data.tags.get(tag_names.TRIAL_STATE) == PRUNED else info.status
        end = info.end_time or None
        trials.append(Trial(
            run_id=info.run_id,
            name=info.run_name or info.run_id[:8],
            status=status,
            params={k[len("sweep."):]: v for k, v in data.params.items() if k.startswith("sweep.")},
            value=data.metrics.get(objective),
            seconds=(end - info.start_time) / 1000 if end and info.start_time else None,
            label=f"trial {data.tags[tag_names.TRIAL]}" if tag_names.TRIAL in data.tags
            else f"#{data.tags.get(tag_names.JOB_NUM, '?')}",
            start=info.start_time or 0,
        ))
    return trials


def best_trial(trials: list[Trial], mode: str) -> Trial | None:
    done = [t for t in trials if t.completed()]
    if not done:
        return None
    sign = -1 if mode == "max" else 1
    return min(done, key=lambda t: (sign * t.value, t.start))  # ties: the earliest trial


def varied_keys(trials: list[Trial]) -> list[str]:
    """The overrides that differ between trials: the sweep's hyperparameters."""
    keys = sorted({k for t in trials for k in t.params})
    return [k for k in keys if len({t.params.get(k) for t in trials}) > 1] or keys


def ranked(trials: list[Trial], mode: str) -> list[Trial]:
    """Completed trials best first, then pruned, failed and the rest."""
    sign = -1 if mode == "max" else 1
    order = {"FINISHED": 0, PRUNED: 1, "FAILED": 2, "KILLED": 3}
    return sorted(trials, key=lambda t: (0 if t.completed() else 1 + order.get(t.status, 4),
                                         sign * t.value if t.completed() else 0.0, t.start))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def format_table(trials: list[Trial], objective: str, mode: str) -> str:
    keys = varied_keys(trials)
    header = ["rank", "run", *keys, objective, "status", "time"]
    rows = []
    for i, t in enumerate(ranked(trials, mode), 1):
        value = f"{t.value:.4f}" if t.value is not None else "-"
        rows.append([str(i), t.label, *(t.params.get(k, "") for k in keys), value, t.status, duration(t.seconds)])
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def plot(trials: list[Trial], objective: str, mode: str, path: Path) -> Path | None:
    """Objective per trial in launch order, with the best so far: how the sweep progressed."""
    done = [t for t in sorted(trials, key=lambda t: t.start) if t.value is not None and math.isfinite(t.value)]
    if not done:
        return None
    colours = {"FINISHED": "tab:blue", PRUNED: "tab:orange"}
    fig, ax = figure((max(6, 0.5 * len(done)), 4))
    xs = range(len(done))
    ax.bar(xs, [t.value for t in done], color=[colours.get(t.status, "tab:red") for t in done])
    best = best_trial(done, mode) or done[0]
    ax.axhline(best.value, color="black", linestyle="--", linewidth=1, label=f"best {best.value:.4f}")
    ax.set_xticks(list(xs), [t.label for t in done], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(objective)
    ax.set_title(f"{objective} per trial (blue finished, orange pruned: last value before pruning)", fontsize=9)
    ax.legend(fontsize=8)
    return save(fig, path)
