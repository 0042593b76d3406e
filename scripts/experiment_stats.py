"""Reading experiment runs back from MLflow, and the statistics their verdicts rest on.

Arms are compared paired by seed: a difference counts only when it exceeds two standard errors
of the per-seed differences; otherwise it is reported as within seed noise, whichever way the
claim goes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import mean, stdev
from typing import Callable

from experiment_tuning import paired

NAN = float("nan")


# -- reading runs ---------------------------------------------------------------------------
def setting(run, key: str) -> str:
    """A swept value as the sweep set it (tag ``sweep.<key>``), else the logged config param, else
    the config group's choice (param ``choice.<group>``: ``strategy=lp_ft`` given, not swept)."""
    value = run.data.tags.get(f"sweep.{key}", run.data.params.get(key, run.data.params.get(f"choice.{key}", "")))
    return {"None": "null", "": "null", "True": "true", "False": "false"}.get(value, value)


def metric(run, name: str) -> float:
    return float(run.data.metrics.get(name, NAN))


def finished(runs: list) -> list:
    return [r for r in runs if r.info.status == "FINISHED"]


def history(run, key: str) -> list[float]:
    """Every logged value of a metric, in step order (the run's metrics hold only the last);
    read from the store scripts/experiments.py points mlflow at."""
    from mlflow.tracking import MlflowClient

    return [m.value for m in sorted(MlflowClient().get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


# -- statistics -----------------------------------------------------------------------------
@dataclass
class Stat:
    values: list[float]

    @property
    def mean(self) -> float:
        return mean(self.values) if self.values else NAN

    @property
    def std(self) -> float:
        return stdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def se(self) -> float:
        return self.std / math.sqrt(len(self.values)) if self.values else NAN

    def show(self, digits: int = 3) -> str:
        if not self.values:
            return "(no run)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def stat(runs: list, value: Callable) -> Stat:
    return Stat([v for v in (value(r) for r in runs) if not math.isnan(v)])


def compare_paired(a: dict[str, float], b: dict[str, float], a_name: str, b_name: str, what: str,
                   higher_is_better: bool = True) -> tuple[int, str]:
    """(+1 a better / -1 b better / 0 within noise, a sentence saying so with the numbers), judged on
    per-seed differences (``a`` and ``b`` map seed -> value): the seed's own luck (data order,
    augmentation) cancels, so 2 SE of the differences is the yardstick."""
    d = paired(a, b)
    if len(d.diffs) < 2:
        return 0, f"{a_name} vs {b_name} on {what}: fewer than 2 seeds finished both"
    sign = 0 if not abs(d.mean) > 2 * d.se else (1 if (d.mean > 0) == higher_is_better else -1)
    numbers = f"{a_name} - {b_name} = {d.mean:+.3f}, 2 SE {2 * d.se:.3f}, {len(d.diffs)} seeds"
    words = {1: f"{a_name} is better on {what}", -1: f"{b_name} is better on {what}",
             0: f"no clear difference on {what} (within seed noise)"}[sign]
    return sign, f"{words} ({numbers})"


def claim(text: str, comparisons: list[tuple[int, str]]) -> str:
    return f"- Claim \"{text}\": {verdict(vote(comparisons))}. " + "; ".join(s for _, s in comparisons) + "."


MIXED = "mixed"


def verdict(supported: bool | None | str) -> str:
    return {True: "**supported**", False: "**contradicted**", None: "**not shown** (within seed noise)",
            MIXED: "**mixed** (clear differences in both directions)"}[supported]


def seeds(runs: list) -> str:
    values = sorted({setting(r, "seed") for r in runs}, key=lambda v: (len(v), v))
    return f"seed{'s' if len(values) > 1 else ''} {', '.join(values)}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def group(runs: list, key: Callable) -> dict:
    out: dict = {}
    for run in runs:
        out.setdefault(key(run), []).append(run)
    return out


def errorbar(ax, xs, stats: list[Stat], label: str, **kw) -> None:
    ax.errorbar(xs, [s.mean for s in stats], yerr=[s.std for s in stats], capsize=3, marker="o", label=label, **kw)


def vote(comparisons: list[tuple[int, str]]) -> bool | None | str:
    """Supported when every clear difference favours the claim, contradicted when every clear
    one goes against it, not shown when none is clear, mixed when clear ones disagree."""
    signs = {s for s, _ in comparisons if s != 0}
    if len(signs) == 2:
        return MIXED
    return None if not signs else signs.pop() > 0
