"""Tables, plots and verdicts of the experiments in experiments/, from their MLflow runs.

One function per experiment takes ``{part: [runs of its latest sweep (per arm)]}`` and a PNG
path, draws the plot and returns the Markdown body. The verdicts are computed from the numbers
(scripts/experiment_stats.py: the 2-SE rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Callable

from experiment_stats import (NAN, claim, compare_paired, errorbar, finished, group, history, metric, seeds, setting,
                              stat, table, verdict)
from experiment_tuning import ARM_TAG, Arm, paired
from tunelab.tracking.plots import figure, save


@dataclass
class Experiment:
    name: str
    title: str
    parts: list[str]
    report: Callable[[dict[str, list], Path], str]
    arms: tuple[Arm, ...]  # each searched, then run over seeds: parts <part>_search and <part> (scripts/experiment_tuning.py)


# -- 1. pretrained vs scratch ----------------------------------------------------------------
FASHION = ("data=fashion_mnist", "data.val_fraction=0.02")  # 1,200 validation images: 6,000 cost more than training


@dataclass(frozen=True)
class Cell:
    """One training set of pretrained_vs_scratch, run with each init."""
    label: str                      # what it trains, as the table names it
    overrides: tuple[str, ...]      # what makes it
    part: str | None = None         # its own experiment files, when not the image ones
    metrics: tuple[str, ...] = ("test/acc",)  # compared pretrained vs scratch, paired by seed


CELLS = {
    "mnist-100": Cell("EfficientNet-Lite0, MNIST-5k, 100 images", ("data.max_train_samples=100",)),
    "mnist-1000": Cell("EfficientNet-Lite0, MNIST-5k, 1,000 images", ("data.max_train_samples=1000",)),
    "fashion-500": Cell("EfficientNet-Lite0, Fashion-MNIST, 500 images", (*FASHION, "data.max_train_samples=500")),
    # three unbalanced classes: accuracy alone cannot tell a majority-class predictor from a model
    "text": Cell("MiniLM-L6, drug reviews, 540 texts", (), "pretrained_vs_scratch_text", ("test/acc", "test/f1")),
}
INITS = {"pretrained": "true", "scratch": "false"}  # arm suffix: model.pretrained
PRETRAINED_ARMS = tuple(Arm(f"{name}-{init}", (*cell.overrides, f"model.pretrained={flag}"), part=cell.part)
                        for name, cell in CELLS.items() for init, flag in INITS.items())


def pretrained_vs_scratch(parts: dict[str, list], png: Path) -> str:
    arms = {a.name: a for a in PRETRAINED_ARMS}
    runs = group(finished(parts["pretrained_vs_scratch"] + parts["pretrained_vs_scratch_text"]),
                 lambda r: r.data.tags.get(ARM_TAG, ""))
    searches = group(parts["pretrained_vs_scratch_search"] + parts["pretrained_vs_scratch_text_search"],
                     lambda r: r.data.tags.get(ARM_TAG, ""))

    def by_seed(arm: str, name: str = "test/acc") -> dict[str, float]:
        return {setting(r, "seed"): metric(r, name) for r in runs.get(arm, [])}

    rows, beats, gaps = [], [], {}
    for cell, spec in CELLS.items():
        pre, scratch = f"{cell}-pretrained", f"{cell}-scratch"
        pre_acc, scratch_acc = by_seed(pre), by_seed(scratch)
        gaps[cell] = {seed: v - scratch_acc.get(seed, NAN) for seed, v in pre_acc.items()}  # NaN: unpaired, dropped
        gap = paired(pre_acc, scratch_acc)
        for name in spec.metrics:
            beats.append(compare_paired(by_seed(pre, name), by_seed(scratch, name), "pretrained", "scratch",
                                        f"{name} ({spec.label})"))
        both = runs.get(pre, []) + runs.get(scratch, [])
        minutes = stat(both, lambda r: metric(r, "time/fit_seconds") / 60).mean
        rows.append([spec.label, stat(runs.get(pre, []), lambda r: metric(r, "test/acc")).show(), chosen(searches.get(pre, []), arms[pre]),
                     stat(runs.get(scratch, []), lambda r: metric(r, "test/acc")).show(),
                     chosen(searches.get(scratch, []), arms[scratch]), f"{gap.mean:+.3f} ({2 * gap.se:.3f})",
                     str(len(both)), f"{minutes:.1f}"])
    body = table(["task, training data", "pretrained test acc", "its LR (search best)", "from scratch",
                  "its LR (search best)", "gap (2 SE)", "runs", "min/run"], rows)
    scarce = compare_paired(gaps["mnist-100"], gaps["mnist-1000"], "the gap at 100 images", "the gap at 1,000",
                            "MNIST-5k test accuracy")
    trials = sorted({len(v) for v in searches.values()})
    everything = [r for group_runs in runs.values() for r in group_runs]
    body += (f"\nTest accuracy, mean ± sample standard deviation over {seeds(everything)}; each seed also draws its "
             "own training subset, the same one for both inits. Each arm ran at its own chosen LR: "
             f"{' or '.join(map(str, trials)) or 'no'} search trials per arm (Optuna, quasi-random, seed 0; log 1e-4..1e-1 "
             "for the images, 1e-5..1e-2 for text), then the best val/acc LR over the seeds. Gap: pretrained minus "
             "scratch, paired by seed, with 2 SE of the per-seed gaps. Every image arm takes the same 64 optimizer "
             "steps (small sets are repeated); BatchNorm uses the pretrained statistics for the pretrained model and "
             "batch statistics for the random one (module.batchnorm=auto).\n\n**Notes**\n\n"
             + claim("a pretrained model beats training from scratch", beats) + "\n"
             + claim("the gap is largest when data is scarce", [scarce]) + "\n")
    _plot_pretrained_vs_scratch(runs, searches, png)
    return body


def _plot_pretrained_vs_scratch(runs: dict[str, list], searches: dict[str, list], png: Path) -> None:
    fig, (ax, bx) = figure((12, 4.5), ncols=2)
    for i, init in enumerate(INITS):
        scores = [stat(runs.get(f"{cell}-{init}", []), lambda r: metric(r, "test/acc")) for cell in CELLS]
        ax.bar([c + (i - 0.5) * 0.4 for c in range(len(CELLS))], [s.mean for s in scores], 0.4,
               yerr=[s.std for s in scores], capsize=3, color=f"C{i}", label=init)
        for marker, cell in zip("osD^", CELLS):
            points = [(lr, v) for lr, v, pruned in search_curve(searches.get(f"{cell}-{init}", [])) if not pruned]
            bx.scatter([lr for lr, _ in points], [v for _, v in points], marker=marker, color=f"C{i}",
                       label=f"{cell}, {init}" if points else None)
    ax.set(xticks=range(len(CELLS)), ylim=(0, 1.05), ylabel="test accuracy (seeds)", title="at each arm's chosen LR")
    ax.set_xticklabels(list(CELLS))
    ax.legend()
    bx.set(xscale="log", xlabel="learning rate", ylabel="best val accuracy", title="each arm's LR search (complete trials)")
    bx.legend(fontsize=7)
    save(fig, png)


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
    """The arm's chosen setting (its search parent's best.<key> tags) and that trial's val acc."""
    from mlflow.tracking import MlflowClient

    if not search:
        return "(no search)"
    parent = MlflowClient().get_run(search[0].data.tags["mlflow.parentRunId"]).data
    values = [f"{k.rsplit('.', 1)[-1]} {float(parent.tags.get('best.' + k, 'nan')):.2g}" for k in arm.searched_keys]
    return ", ".join(values) + f" (val {parent.metrics.get('best/val/acc', NAN):.3f})"


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
    lost = {a: {seed: by_seed[a]["test acc"][seed] - v for seed, v in by_seed[a]["sklearn digits acc"].items()} for a in arms}
    drop = [compare_paired(lost[n], lost["full"], n, "full", "accuracy lost under the natural shift", False)
            for n in ("gradual", "lp_ft")]
    forgetting = [*against_full(("full_l2sp",), "ImageNet agreement"), *against_full(("full_l2sp",), "ImageNet KL"),
                  *against_full(("full_l2sp",), "backbone drift")]
    trials = sorted({len(v) for v in searches.values()})
    notes = [
        claim("freezing lower layers and lowering their LRs helps on small data (500 images)", small),
        claim("gradual unfreezing and LP-FT keep more OOD accuracy than full fine-tuning, on the natural shift "
              "(scikit-learn's digits)", natural),
        claim("the same, on the accuracy lost under the natural shift (test acc - sklearn digits acc, which "
              "discounts a better in-distribution fit)", drop),
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


# -- 3. learning rate and schedule -----------------------------------------------------------
SCHEDULERS = ("warmup_cosine", "constant", "linear", "one_cycle")
SCHEDULE_ARMS = tuple(Arm(name, (f"scheduler={name}",)) for name in SCHEDULERS)


def search_curve(search: list) -> list[tuple[float, float, bool]]:
    """(lr, best val acc of the trial, pruned) per trial of a search, by LR."""
    points = []
    for run in search:
        curve = history(run, "val/acc")
        if curve and run.info.status in ("FINISHED", "KILLED"):
            points.append((float(setting(run, "optimizer.lr")), max(curve), run.data.tags.get("tunelab.trial_state") == "PRUNED"))
    return sorted(points)


def lr_and_schedule(parts: dict[str, list], png: Path) -> str:
    runs = group(finished(parts["lr_and_schedule"]), lambda r: r.data.tags.get(ARM_TAG, setting(r, "scheduler")))
    searches = group(parts["lr_and_schedule_search"], lambda r: r.data.tags.get(ARM_TAG, ""))
    curves = {a: search_curve(searches.get(a, [])) for a in SCHEDULERS}
    test = {a: {setting(r, "seed"): metric(r, "test/acc") for r in runs.get(a, [])} for a in SCHEDULERS}
    rows = []
    for arm in SCHEDULE_ARMS:
        points = [v for _, v, pruned in curves[arm.name] if not pruned]
        span = f"{min(points):.3f} .. {max(points):.3f}" if points else "(none)"
        pruned = sum(p for *_, p in curves[arm.name])
        rows.append([arm.name, chosen(searches.get(arm.name, []), arm), f"{span} ({pruned} pruned)",
                     stat(runs.get(arm.name, []), lambda r: metric(r, "test/acc")).show(), str(len(runs.get(arm.name, [])))])
    body = table(["scheduler", "chosen LR (search best)", "search val acc, complete trials", "test acc", "runs"], rows)
    decaying = [compare_paired(test[a], test["constant"], a, "constant", "test acc") for a in SCHEDULERS if a != "constant"]
    lr_spreads = {a: max(v for _, v, p in c if not p) - min(v for _, v, p in c if not p)
                  for a, c in curves.items() if sum(not p for *_, p in c) > 1}
    means = {a: stat(runs.get(a, []), lambda r: metric(r, "test/acc")).mean for a in SCHEDULERS if runs.get(a)}
    schedule_spread = max(means.values()) - min(means.values()) if means else NAN
    lr_words = (f"within each scheduler's search the LR moves val acc by {min(lr_spreads.values()):.3f} .. "
                f"{max(lr_spreads.values()):.3f} (best minus worst complete trial), while the four schedules, each at "
                f"its tuned LR, differ by at most {schedule_spread:.3f} in mean test acc") if lr_spreads else "no search to read"
    lr_verdict = verdict(min(lr_spreads.values()) > schedule_spread) if lr_spreads and means else "not tested"
    trials = sorted({len(v) for v in searches.values()})
    body += (f"\nTest accuracy, mean ± sample standard deviation over {seeds(parts['lr_and_schedule'])}, each scheduler "
             f"at its own LR: {' or '.join(map(str, trials))} search trials per scheduler (Optuna, quasi-random, seed 0, "
             "log 1e-5..1e-2, median pruner), then the best val/acc LR over the seeds; comparisons paired by seed. "
             "Layer-wise LR decay, once a claim of this experiment, is tested in strategy_shootout "
             "(full_llrd against full, each with its own search).\n\n**Notes**\n\n"
             + claim("a warmup/decaying schedule beats a constant LR", decaying) + "\n"
             + f"- Claim \"the LR matters more than the schedule\": {lr_verdict}; {lr_words}.\n")
    fig, (ax, bx) = figure((11, 4.5), ncols=2)
    for i, arm in enumerate(SCHEDULERS):
        for pruned, marker in ((False, "o"), (True, "x")):
            pts = [(lr, v) for lr, v, p in curves[arm] if p == pruned]
            ax.scatter([lr for lr, _ in pts], [v for _, v in pts], marker=marker, color=f"C{i}",
                       label=f"{arm}{' (pruned)' if pruned else ''}" if pts else None)
        s = stat(runs.get(arm, []), lambda r: metric(r, "test/acc"))
        bx.bar(i, s.mean, yerr=s.std, capsize=3, color=f"C{i}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="best val accuracy", title="each scheduler's LR search (x = pruned)")
    ax.legend(fontsize=7)
    bx.set(xticks=range(len(SCHEDULERS)), ylabel="test accuracy (seeds)", title="at each scheduler's chosen LR")
    bx.set_xticklabels(SCHEDULERS)
    save(fig, png)
    return body


# -- 4. few shot -----------------------------------------------------------------------------
FEW_SHOT = ["linear_probe", "full", "lp_ft"]
SHOTS = (1, 5, 25)
FEW_SHOT_ARMS = tuple(Arm(f"{s}-{k}", (f"strategy={s}", f"data.samples_per_class={k}"),
                          (f"strategy.lr_mult={MULT}",) if s == "lp_ft" else ()) for k in SHOTS for s in FEW_SHOT)


def _short(value: str) -> str:
    """A logged number in 2 significant digits (0.10000000000000002 -> 0.1); anything else as is."""
    try:
        return f"{float(value):.2g}"
    except ValueError:
        return value


def few_shot(parts: dict[str, list], png: Path) -> str:
    runs = finished(parts["few_shot"])
    cell = group(runs, lambda r: (int(setting(r, "data.samples_per_class")), setting(r, "strategy")))
    shots = sorted({k for k, _ in cell})
    stats = {(k, s): stat(cell.get((k, s), []), lambda r: metric(r, "test/acc")) for k in shots for s in FEW_SHOT}
    by_seed = {(k, s): {setting(r, "seed"): metric(r, "test/acc") for r in cell.get((k, s), [])} for k in shots for s in FEW_SHOT}
    lr = {(k, s): f" (lr {float(setting(v[0], 'optimizer.lr')):.1e}"
          + (f", x{_short(setting(v[0], 'strategy.lr_mult'))} after the probe)" if s == "lp_ft" else ")")
          for (k, s), v in cell.items()}
    rows = []
    for k in shots:
        best = max(FEW_SHOT, key=lambda s: -math.inf if math.isnan(stats[(k, s)].mean) else stats[(k, s)].mean)
        rows.append([f"{k} ({k * 10} images)", *(("**" + stats[(k, s)].show() + "**" if s == best else stats[(k, s)].show())
                                                  + lr.get((k, s), "") for s in FEW_SHOT)])
    body = table(["labelled per class", *FEW_SHOT], rows)
    fewest, most = shots[0], shots[-1]
    probe_first = [compare_paired(by_seed[(fewest, "linear_probe")], by_seed[(fewest, s)], "linear_probe", s,
                                  f"test accuracy at {fewest}/class") for s in ("full", "lp_ft")]
    lp_ft_last = [compare_paired(by_seed[(most, "lp_ft")], by_seed[(most, s)], "lp_ft", s, f"test accuracy at {most}/class")
                  for s in ("full", "linear_probe")]
    trials = sorted({len(v) for v in group(parts.get("few_shot_search", []), lambda r: r.data.tags.get(ARM_TAG, "")).values()})
    body += (f"\nTest accuracy, mean ± sample standard deviation over {seeds(runs)}; each seed draws its own labelled "
             "images. Bold: the best mean in the row. Each cell ran at its own chosen LR (shown; lp_ft also tuned its "
             f"fine-tuning multiplier): {' or '.join(map(str, trials)) or 'no'} search trials per cell (Optuna, "
             "quasi-random, seed 0, log 1e-4..1e-1), scored on the full validation split (500 images), which a real "
             "user with this few labels would not have: the searches give every strategy its best case. "
             "Comparisons are paired by seed (the same labelled images for every strategy).\n\n**Notes**\n\n"
             + claim("with the fewest labels a linear probe is the safe choice", probe_first) + "\n"
             + claim("LP-FT is best once there are more labels", lp_ft_last) + "\n")
    fig, ax = figure((6.5, 4.5))
    for s in FEW_SHOT:
        errorbar(ax, shots, [stats[(k, s)] for k in shots], s)
    ax.set(xscale="log", xlabel="labelled images per class", ylabel="test accuracy", title="few-shot MNIST-5k, EfficientNet-Lite0")
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.legend()
    save(fig, png)
    return body


REPORTS = {e.name: e for e in [
    Experiment("pretrained_vs_scratch", "Pretrained vs trained from scratch, each at its own tuned LR",
               ["pretrained_vs_scratch_search", "pretrained_vs_scratch", "pretrained_vs_scratch_text_search",
                "pretrained_vs_scratch_text"], pretrained_vs_scratch, PRETRAINED_ARMS),
    Experiment("strategy_shootout", "Seven fine-tuning strategies, each at its own tuned LR",
               ["strategy_shootout_search", "strategy_shootout"], strategy_shootout, SHOOTOUT_ARMS),
    Experiment("lr_and_schedule", "Learning rate against schedule, each schedule at its own tuned LR",
               ["lr_and_schedule_search", "lr_and_schedule"], lr_and_schedule, SCHEDULE_ARMS),
    Experiment("few_shot", "Accuracy against labelled examples per class, each cell at its own tuned LR",
               ["few_shot_search", "few_shot"], few_shot, FEW_SHOT_ARMS),
]}
