"""Tables, plots and verdicts of the experiments in experiments/, from their MLflow runs.

One function per experiment takes ``{part: [runs of its latest sweep]}`` and a PNG path, draws the
plot and returns the Markdown body. The verdicts are computed from the numbers: a difference
counts only when it exceeds two standard errors over the seeds; otherwise it is reported as
within seed noise, whichever way the claim goes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev
from typing import Callable

from experiment_tuning import ARM_TAG, Arm, paired
from tunelab.tracking.plots import figure, save

NAN = float("nan")


@dataclass
class Experiment:
    name: str
    title: str
    parts: list[str]
    report: Callable[[dict[str, list], Path], str]
    arms: tuple[Arm, ...] = ()  # tuned arms: parts are <name>_search and <name> (scripts/experiment_tuning.py)


# -- reading runs ---------------------------------------------------------------------------
def setting(run, key: str) -> str:
    """A swept value as the sweep set it (tag ``sweep.<key>``), else the logged config param."""
    value = run.data.tags.get(f"sweep.{key}", run.data.params.get(key, ""))
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


def ood_accuracy(run) -> float:
    """Mean accuracy over the shifted test copies (data.ood)."""
    values = [v for k, v in run.data.metrics.items() if k.startswith("ood/") and k.endswith("/acc")]
    return mean(values) if values else NAN


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


def se_of_difference(a: Stat, b: Stat) -> float:
    return math.sqrt(a.se ** 2 + b.se ** 2)


def compare(a: Stat, b: Stat, a_name: str, b_name: str, what: str, higher_is_better: bool = True) -> tuple[int, str]:
    """(+1 a better / -1 b better / 0 within noise, a sentence saying so with the numbers)."""
    if not a.values or not b.values:
        return 0, f"{a_name} vs {b_name} on {what}: not measured (no finished run)"
    diff, se = a.mean - b.mean, se_of_difference(a, b)
    sign = 0 if abs(diff) <= 2 * se else (1 if (diff > 0) == higher_is_better else -1)
    numbers = f"{a_name} {a.mean:.3f} vs {b_name} {b.mean:.3f}, difference {diff:+.3f}, 2 SE {2 * se:.3f}"
    words = {1: f"{a_name} is better on {what}", -1: f"{b_name} is better on {what}",
             0: f"no clear difference on {what} (within seed noise)"}[sign]
    return sign, f"{words} ({numbers})"


def compare_paired(a: dict[str, float], b: dict[str, float], a_name: str, b_name: str, what: str,
                   higher_is_better: bool = True) -> tuple[int, str]:
    """As ``compare``, on per-seed differences (``a`` and ``b`` map seed -> value): the seed's own
    luck (data order, augmentation) cancels, so 2 SE of the differences is the yardstick."""
    d = paired(a, b)
    if len(d.diffs) < 2:
        return 0, f"{a_name} vs {b_name} on {what}: fewer than 2 seeds finished both"
    sign = 0 if not abs(d.mean) > 2 * d.se else (1 if (d.mean > 0) == higher_is_better else -1)
    numbers = f"{a_name} - {b_name} = {d.mean:+.3f}, 2 SE {2 * d.se:.3f}, {len(d.diffs)} seeds"
    words = {1: f"{a_name} is better on {what}", -1: f"{b_name} is better on {what}",
             0: f"no clear difference on {what} (within seed noise)"}[sign]
    return sign, f"{words} ({numbers})"


def claim(text: str, comparisons: list[tuple[int, str]]) -> str:
    return f"- Claim \"{text}\": {verdict(_vote(comparisons))}. " + "; ".join(s for _, s in comparisons) + "."


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


# -- 1. pretrained vs scratch ----------------------------------------------------------------
IMAGE_PARTS = {"pretrained_vs_scratch": ("MNIST-5k", 3500), "pretrained_vs_scratch_fashion": ("Fashion-MNIST", None)}


def pretrained_vs_scratch(parts: dict[str, list], png: Path) -> str:
    acc = lambda r: metric(r, "test/acc")  # noqa: E731
    minutes = lambda runs: stat(runs, lambda r: metric(r, "time/fit_seconds") / 60).mean  # noqa: E731
    rows, notes, comparisons, curves = [], [], [], {}
    gap_claims = []
    for part, (data_name, full_size) in IMAGE_PARTS.items():
        images = finished(parts.get(part, []))
        if not images:
            continue
        cell = group(images, lambda r: (setting(r, "data.max_train_samples"), setting(r, "model.pretrained")))
        sizes = sorted({size for size, _ in cell}, key=lambda s: math.inf if s == "null" else int(s))
        counts = [full_size if size == "null" else int(size) for size in sizes]
        curves[data_name] = (counts, [stat(cell.get((z, "true"), []), acc) for z in sizes],
                             [stat(cell.get((z, "false"), []), acc) for z in sizes])
        gaps, gap_se = [], []
        for size, count, pre, scratch in zip(sizes, counts, *curves[data_name][1:]):
            gap_se.append(se_of_difference(pre, scratch))
            label = f"{count:,}" + (" (all)" if size == "null" else "")
            sign, sentence = compare(pre, scratch, "pretrained", "scratch", "test accuracy")
            comparisons.append((sign, sentence))
            gaps.append((label, pre.mean - scratch.mean))
            both = cell.get((size, "true"), []) + cell.get((size, "false"), [])
            rows.append([f"EfficientNet-Lite0, {data_name}, {label} images", pre.show(), scratch.show(),
                         f"{pre.mean - scratch.mean:+.3f}", str(len(both)), f"{minutes(both):.1f}"])
            notes.append(f"- {data_name}, {label} images: {sentence}.")
        # the gap with the fewest images against the gap with the most, beyond 2 SE of their difference
        change, se = gaps[0][1] - gaps[-1][1], math.sqrt(gap_se[0] ** 2 + gap_se[-1] ** 2)
        shrinking = None if len(gaps) < 2 or math.isnan(change) or abs(change) <= 2 * se else change > 0
        gap_claims.append(f"- Claim \"the gap is largest when data is scarce\" ({data_name}, fewest vs most images): "
                          f"{verdict(shrinking)}; gaps by size: " + ", ".join(f"{label} {gap:+.3f}" for label, gap in gaps)
                          + f" (difference {change:+.3f}, 2 SE {2 * se:.3f}).")
    text = finished(parts.get("pretrained_vs_scratch_text", []))
    by_init = group(text, lambda r: setting(r, "model.pretrained"))
    text_stats = {}
    for name, key in (("test/acc", "test accuracy"), ("test/f1", "macro-F1")):
        pre, scratch = (stat(by_init.get(flag, []), lambda r: metric(r, name)) for flag in ("true", "false"))
        text_stats[key] = (pre, scratch)
        sign, sentence = compare(pre, scratch, "pretrained", "scratch", key)
        comparisons.append((sign, sentence))
        rows.append([f"MiniLM-L6, drug reviews (541 texts), {key}", pre.show(), scratch.show(),
                     f"{pre.mean - scratch.mean:+.3f}", str(len(pre.values) + len(scratch.values)), f"{minutes(text):.1f}"])
        notes.append(f"- drug reviews: {sentence}.")
    body = table(["task, training data", "pretrained (mean ± std)", "from scratch", "gap", "runs", "min/run"], rows)
    signs = [sign for sign, _ in comparisons]
    everything = [r for runs in parts.values() for r in runs]
    body += (f"\nScores are test-split metrics, mean ± sample standard deviation over {seeds(everything)} "
             "(each seed also draws its own training subset). Both arms share one recipe; BatchNorm uses the "
             "pretrained statistics for the pretrained model and batch statistics for the random one "
             "(module.batchnorm=auto).\n\n**Notes**\n\n"
             f"- Claim \"a pretrained model beats training from scratch\": {verdict(_vote(comparisons))} "
             f"({signs.count(1)} of {len(signs)} comparisons favour pretrained beyond 2 SE, "
             f"{signs.count(-1)} favour scratch).\n" + "\n".join(gap_claims + notes) + "\n")
    fig, axes = figure((5 * (len(curves) + 1), 4), ncols=len(curves) + 1)
    for ax, (data_name, (counts, pre, scratch)) in zip(axes, curves.items()):
        errorbar(ax, counts, pre, "ImageNet-pretrained")
        errorbar(ax, counts, scratch, "random init")
        ax.set(xscale="log", xlabel=f"training images ({data_name})", ylabel="test accuracy",
               title=f"EfficientNet-Lite0, {data_name}")
        ax.legend()
    bx = axes[-1]
    for i, (pre, scratch) in enumerate(text_stats.values()):
        bx.bar([i - 0.2], [pre.mean], 0.4, yerr=[pre.std], capsize=3, color="C0", label="pretrained" if i == 0 else None)
        bx.bar([i + 0.2], [scratch.mean], 0.4, yerr=[scratch.std], capsize=3, color="C1",
               label="random init" if i == 0 else None)
    bx.set(xticks=range(len(text_stats)), title="MiniLM-L6, drug reviews")
    bx.set_xticklabels(list(text_stats))
    bx.legend()
    save(fig, png)
    return body


# -- 2. strategy shootout --------------------------------------------------------------------
MULT = "tag(log, interval(0.01, 1.0))"  # a backbone LR multiplier, searched log-uniformly
SHOOTOUT_ARMS = (
    Arm("full", ("strategy=full",)),
    Arm("linear_probe", ("strategy=linear_probe",)),
    Arm("freeze_unfreeze", ("strategy=freeze_unfreeze",), (f"strategy.lr_mult={MULT}",)),
    Arm("gradual", ("strategy=gradual",), (f"strategy.lr_mult={MULT}",)),
    Arm("lp_ft", ("strategy=lp_ft",), (f"strategy.lr_mult={MULT}",)),
    Arm("full_llrd", ("strategy=full_llrd",), ("module.layer_decay=interval(0.5, 1.0)",)),
    Arm("full_l2sp", ("strategy=full_l2sp",), ("regularizer.alpha=tag(log, interval(0.001, 10.0))",)),
)
SYNTHETIC = ("rotated", "noised", "blurred", "low_contrast")


def synthetic_ood(run) -> float:
    values = [metric(run, f"ood/{name}/acc") for name in SYNTHETIC]
    return mean(values) if not any(math.isnan(v) for v in values) else NAN


SHOOTOUT_COLUMNS = {  # column: (value of a run, higher is better)
    "test acc": (lambda r: metric(r, "test/acc"), True),
    "sklearn digits acc": (lambda r: metric(r, "ood/sklearn_digits/acc"), True),
    "synthetic shifts acc": (synthetic_ood, True),
    "ImageNet agreement": (lambda r: metric(r, "retention/imagenet_agreement"), True),
    "ImageNet KL": (lambda r: metric(r, "retention/imagenet_kl"), False),
    "backbone drift": (lambda r: metric(r, "retention/drift/backbone"), False),
    "CKA": (lambda r: metric(r, "retention/cka"), True),
}


def chosen(search: list, arm: Arm) -> str:
    """The arm's chosen setting (its search parent's best.<key> tags) and the best val acc."""
    from mlflow.tracking import MlflowClient

    if not search:
        return "(no search)"
    parent = MlflowClient().get_run(search[0].data.tags["mlflow.parentRunId"])
    values = [f"{k.rsplit('.', 1)[-1]} {float(parent.data.tags.get('best.' + k, 'nan')):.2g}" for k in arm.searched_keys]
    best = max((metric(r, "val/acc") for r in finished(search)), default=NAN)
    return ", ".join(values) + f" (val {best:.3f})"


def strategy_shootout(parts: dict[str, list], png: Path) -> str:
    arms = [a.name for a in SHOOTOUT_ARMS]
    runs = group(finished(parts["strategy_shootout"]), lambda r: r.data.tags.get(ARM_TAG, setting(r, "strategy")))
    searches = group(parts["strategy_shootout_search"], lambda r: r.data.tags.get(ARM_TAG, ""))
    by_seed = {a: {col: {setting(r, "seed"): fn(r) for r in runs.get(a, [])} for col, (fn, _) in SHOOTOUT_COLUMNS.items()}
               for a in arms}
    rows = []
    for arm in SHOOTOUT_ARMS:
        mine = runs.get(arm.name, [])
        cells = [stat(mine, fn).show() for fn, _ in SHOOTOUT_COLUMNS.values()]
        trainable = stat(mine, lambda r: metric(r, "params/trainable")).mean
        seconds = stat(mine, lambda r: metric(r, "time/fit_seconds")).mean
        rows.append([arm.name, chosen(searches.get(arm.name, []), arm), *cells,
                     f"{trainable / 1e6:.2f} M" if not math.isnan(trainable) else "?", f"{seconds:.0f}", str(len(mine))])
    body = table(["strategy", "chosen setting (search best)", *SHOOTOUT_COLUMNS, "trainable params", "s/run", "runs"], rows)

    def against_full(names, column):
        higher = SHOOTOUT_COLUMNS[column][1]
        return [compare_paired(by_seed[n][column], by_seed["full"][column], n, "full", column, higher) for n in names]

    small = against_full(("freeze_unfreeze", "gradual", "full_llrd"), "test acc")
    natural = against_full(("gradual", "lp_ft"), "sklearn digits acc")
    synthetic = against_full(("gradual", "lp_ft"), "synthetic shifts acc")
    forgetting = [*against_full(("full_l2sp",), "ImageNet agreement"), *against_full(("full_l2sp",), "ImageNet KL"),
                  *against_full(("full_l2sp",), "backbone drift")]
    trials = sorted({len(v) for v in searches.values()})
    notes = [
        claim("freezing lower layers and lowering their LRs helps on small data (500 images)", small),
        claim("gradual unfreezing and LP-FT keep more OOD accuracy than full fine-tuning, on the natural shift "
              "(scikit-learn's digits)", natural),
        claim("the same, on the four synthetic shifts", synthetic),
        claim("L2-SP reduces forgetting (ImageNet agreement and KL on 220 natural images, weight drift)", forgetting),
    ]
    body += (f"\nMean ± sample standard deviation over {seeds(parts['strategy_shootout'])}, each arm at its own chosen "
             f"setting: {' or '.join(map(str, trials))} search trials per arm (Optuna, quasi-random, seed 0, base LR "
             "log 1e-4..1e-1 plus the knob shown), then the best val/acc setting over the seeds. Comparisons are "
             "paired by seed (the same seed draws the same data order and augmentation for every arm); a "
             "difference counts when it exceeds 2 SE of the per-seed differences. sklearn digits: scikit-learn's "
             "1,797 8x8 digits by other writers, upsampled; synthetic shifts: mean of the rotated, noised, blurred "
             "and low-contrast test copies. ImageNet agreement: share of scikit-image's 220 natural images "
             "(photos, LFW faces and non-faces) on which the original ImageNet head, reading the fine-tuned "
             "features, predicts the class it predicted before fine-tuning; KL is the mean KL divergence of the "
             "two predictions. Drift is ||w - w0|| / ||w0|| over the backbone; CKA compares the features the head "
             "reads on 256 test images. Trainable parameters are those of the last stage.\n\n**Notes**\n\n"
             + "\n".join(notes) + "\n")
    fig, (ax, bx) = figure((11, 4.5), ncols=2)
    for i, name in enumerate(arms):
        s = {col: stat(runs.get(name, []), fn) for col, (fn, _) in SHOOTOUT_COLUMNS.items()}
        ax.errorbar(s["test acc"].mean, s["sklearn digits acc"].mean, xerr=s["test acc"].std,
                    yerr=s["sklearn digits acc"].std, marker="o", capsize=2, color=f"C{i}", label=name)
        bx.bar(i, s["ImageNet agreement"].mean, yerr=s["ImageNet agreement"].std, capsize=2, color=f"C{i}")
    ax.set(xlabel="test accuracy (MNIST-5k)", ylabel="accuracy on scikit-learn's digits", title="in- vs out-of-distribution")
    ax.legend(fontsize=7)
    bx.set(xticks=range(len(arms)), ylim=(0, 1.05), ylabel="ImageNet top-1 agreement (220 images)",
           title="forgetting (higher keeps more)")
    bx.set_xticklabels(arms, rotation=45, ha="right")
    save(fig, png)
    return body


def _by_margin(claimed: float, other: float, margin: float = 0.01) -> str:
    """A verdict between two single best trials: differences under ``margin`` count as noise."""
    if math.isnan(claimed) or math.isnan(other):
        return "not tested (no complete trial on each side)"
    if abs(claimed - other) < margin:
        return f"**not shown** (bests within {margin})"
    return verdict(claimed > other) + f" (bests {claimed:.3f} vs {other:.3f}; single trials, differences under {margin} count as noise)"


def _vote(comparisons: list[tuple[int, str]]) -> bool | None | str:
    """Supported when every clear difference favours the claim, contradicted when every clear
    one goes against it, not shown when none is clear, mixed when clear ones disagree."""
    signs = {s for s, _ in comparisons if s != 0}
    if len(signs) == 2:
        return MIXED
    return None if not signs else signs.pop() > 0


# -- 3. learning rate and schedule -----------------------------------------------------------
def lr_and_schedule(parts: dict[str, list], png: Path) -> str:
    trials = [r for r in parts["lr_and_schedule"] if r.info.status in ("FINISHED", "KILLED")]
    pruned = [r for r in trials if r.data.tags.get("tunelab.trial_state") == "PRUNED"]
    complete = [r for r in trials if r.info.status == "FINISHED"]
    max_epochs = int(float(complete[0].data.params.get("trainer.max_epochs", 4))) if complete else 4
    curves = {r.info.run_id: history(r, "val/acc") for r in trials}  # one point per validated epoch
    best_val = lambda r: max(curves[r.info.run_id], default=NAN)  # noqa: E731
    epochs = {r.info.run_id: len(curves[r.info.run_id]) for r in trials}
    seconds = {r.info.run_id: (r.info.end_time - r.info.start_time) / 1000 for r in trials if r.info.end_time}
    ranked = sorted(trials, key=lambda r: -best_val(r) if not math.isnan(best_val(r)) else 0)
    rows = [[str(i + 1), f"{float(setting(r, 'optimizer.lr')):.2e}", setting(r, "scheduler"), setting(r, "module.layer_decay"),
             f"{best_val(r):.3f}", f"{metric(r, 'test/acc'):.3f}" if r in complete else "",
             f"{epochs[r.info.run_id]}/{max_epochs}", "pruned" if r in pruned else "complete"]
            for i, r in enumerate(ranked)]
    body = table(["rank", "lr", "scheduler", "layer decay", "val acc (best)", "test acc", "epochs", "trial"], rows)
    trained = sum(epochs.values())
    per_epoch = mean(seconds[r.info.run_id] / max_epochs for r in complete if r.info.run_id in seconds) if complete else NAN
    saved_epochs = len(trials) * max_epochs - trained
    spent = sum(seconds.values())
    best = ranked[0] if ranked else None
    by_scheduler = group(complete, lambda r: setting(r, "scheduler"))
    by_decay = group(complete, lambda r: setting(r, "module.layer_decay"))
    best_of = lambda g: {k: max(best_val(r) for r in v) for k, v in sorted(g.items())}  # noqa: E731
    sched_best, decay_best = best_of(by_scheduler), best_of(by_decay)
    lrs = sorted(complete, key=lambda r: float(setting(r, "optimizer.lr")))
    body += (f"\n{len(trials)} trials (Optuna TPE), {len(complete)} complete, {len(pruned)} pruned by the median pruner. "
             f"Every trial's val acc is its best epoch's.\n\n**Pruning**: {trained} of {len(trials) * max_epochs} epochs "
             f"trained ({saved_epochs} saved, {saved_epochs / max(1, len(trials) * max_epochs):.0%}); the search took "
             f"{spent / 60:.1f} min, about {saved_epochs * per_epoch / 60:.1f} min less than without pruning "
             f"({per_epoch:.1f} s per epoch of a complete trial, start-up included).\n\n")
    if best is not None:
        body += (f"**Best**: lr {float(setting(best, 'optimizer.lr')):.2e}, scheduler {setting(best, 'scheduler')}, "
                 f"layer decay {setting(best, 'module.layer_decay')}: val acc {best_val(best):.3f}, "
                 f"test acc {metric(best, 'test/acc'):.3f}.\n\n")
    notes = []
    if complete:
        constant = sched_best.get("constant", NAN)
        decaying = max((v for k, v in sched_best.items() if k != "constant"), default=NAN)
        decayed = max((v for k, v in decay_best.items() if float(k) < 1), default=NAN)
        accs = [best_val(r) for r in complete]
        lrs = sorted(float(setting(r, "optimizer.lr")) for r in complete)
        lr_spread = max(accs) - min(accs)
        schedule_spread = max(sched_best.values()) - min(sched_best.values())
        notes = [
            "- Best val acc by scheduler (complete trials): " + ", ".join(f"{k} {v:.3f}" for k, v in sched_best.items())
            + f". Claim \"a warmup/decaying schedule beats a constant LR\": {_by_margin(decaying, constant)}.",
            "- Best val acc by layer decay: " + ", ".join(f"{k} {v:.3f}" for k, v in decay_best.items())
            + f". Claim \"lower LRs for lower layers help\" (best with decay < 1 vs best with 1.0): "
            f"{_by_margin(decayed, decay_best.get('1.0', NAN))}.",
            f"- Learning rate: complete trials span {lrs[0]:.1e} .. {lrs[-1]:.1e} and val acc {min(accs):.3f} .. "
            f"{max(accs):.3f} (spread {lr_spread:.3f}), against a spread of {schedule_spread:.3f} between the "
            f"schedulers' bests. Claim \"the LR matters more than the schedule\": {verdict(lr_spread > schedule_spread)}.",
        ]
    body += ("**Notes** (a TPE search is not a balanced grid: it spends its trials near the best LR, so the "
             "per-setting bests below compare unequal numbers of trials, and single runs, not seeds)\n\n"
             + "\n".join(notes) + "\n")
    fig, ax = figure((7, 4.5))
    for i, (name, group_runs) in enumerate(sorted(group(trials, lambda r: setting(r, "scheduler")).items())):
        for state, marker in (("complete", "o"), ("pruned", "x")):
            chosen = [r for r in group_runs if (r in pruned) == (state == "pruned")]
            ax.scatter([float(setting(r, "optimizer.lr")) for r in chosen], [best_val(r) for r in chosen],
                       marker=marker, color=f"C{i}", label=f"{name} ({state})" if chosen else None)
    ax.set(xscale="log", xlabel="learning rate", ylabel="best val accuracy", title="Optuna trials (x = pruned)")
    ax.legend(fontsize=7)
    save(fig, png)
    return body


# -- 4. few shot -----------------------------------------------------------------------------
FEW_SHOT = ["linear_probe", "full", "lp_ft"]


def few_shot(parts: dict[str, list], png: Path) -> str:
    runs = finished(parts["few_shot"])
    cell = group(runs, lambda r: (int(setting(r, "data.samples_per_class")), setting(r, "strategy")))
    shots = sorted({k for k, _ in cell})
    stats = {(k, s): stat(cell.get((k, s), []), lambda r: metric(r, "test/acc")) for k in shots for s in FEW_SHOT}
    rows = []
    for k in shots:
        best = max(FEW_SHOT, key=lambda s: -math.inf if math.isnan(stats[(k, s)].mean) else stats[(k, s)].mean)
        rows.append([f"{k} ({k * 10} images)", *(("**" + stats[(k, s)].show() + "**") if s == best else stats[(k, s)].show()
                                                  for s in FEW_SHOT)])
    body = table(["labelled per class", *FEW_SHOT], rows)
    fewest, most = shots[0], shots[-1]
    probe_first = [compare(stats[(fewest, "linear_probe")], stats[(fewest, s)], "linear_probe", s, f"test accuracy at {fewest}/class")
                   for s in ("full", "lp_ft")]
    lp_ft_last = [compare(stats[(most, "lp_ft")], stats[(most, s)], "lp_ft", s, f"test accuracy at {most}/class")
                  for s in ("full", "linear_probe")]
    body += (f"\nTest accuracy, mean ± sample standard deviation over {seeds(runs)}; each seed "
             "draws its own labelled images. Bold: the best mean in the row. All three strategies share one base LR "
             "and step budget (nothing tuned per strategy), so the probe's head trains for as many steps at the same "
             "LR as full fine-tuning's.\n\n**Notes**\n\n"
             f"- Claim \"with the fewest labels a linear probe is the safe choice\": {verdict(_vote(probe_first))}. "
             + "; ".join(s for _, s in probe_first) + ".\n"
             f"- Claim \"LP-FT is best once there are more labels\": {verdict(_vote(lp_ft_last))}. "
             + "; ".join(s for _, s in lp_ft_last) + ".\n")
    fig, ax = figure((6.5, 4.5))
    for s in FEW_SHOT:
        errorbar(ax, shots, [stats[(k, s)] for k in shots], s)
    ax.set(xscale="log", xlabel="labelled images per class", ylabel="test accuracy", title="few-shot MNIST-5k, EfficientNet-Lite0")
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.legend()
    save(fig, png)
    return body


REPORTS = {e.name: e for e in [
    Experiment("pretrained_vs_scratch", "Pretrained vs trained from scratch",
               ["pretrained_vs_scratch", "pretrained_vs_scratch_fashion", "pretrained_vs_scratch_text"],
               pretrained_vs_scratch),
    Experiment("strategy_shootout", "Seven fine-tuning strategies, each at its own tuned LR",
               ["strategy_shootout_search", "strategy_shootout"], strategy_shootout, SHOOTOUT_ARMS),
    Experiment("lr_and_schedule", "Learning rate, schedule and layer decay (Optuna, pruned)",
               ["lr_and_schedule"], lr_and_schedule),
    Experiment("few_shot", "Accuracy against labelled examples per class", ["few_shot"], few_shot),
]}
