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

from experiment_stats import (NAN, claim, compare, compare_paired, errorbar, finished, group, history,
                              metric, se_of_difference, seeds, setting, stat, table, verdict, vote)
from experiment_tuning import ARM_TAG, Arm
from tunelab.tracking.plots import figure, save


@dataclass
class Experiment:
    name: str
    title: str
    parts: list[str]
    report: Callable[[dict[str, list], Path], str]
    arms: tuple[Arm, ...] = ()  # tuned arms: parts are <name>_search and <name> (scripts/experiment_tuning.py)


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
             f"- Claim \"a pretrained model beats training from scratch\": {verdict(vote(comparisons))} "
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
    Experiment("pretrained_vs_scratch", "Pretrained vs trained from scratch",
               ["pretrained_vs_scratch", "pretrained_vs_scratch_fashion", "pretrained_vs_scratch_text"],
               pretrained_vs_scratch),
    Experiment("strategy_shootout", "Seven fine-tuning strategies, each at its own tuned LR",
               ["strategy_shootout_search", "strategy_shootout"], strategy_shootout, SHOOTOUT_ARMS),
    Experiment("lr_and_schedule", "Learning rate against schedule, each schedule at its own tuned LR",
               ["lr_and_schedule_search", "lr_and_schedule"], lr_and_schedule, SCHEDULE_ARMS),
    Experiment("few_shot", "Accuracy against labelled examples per class, each cell at its own tuned LR",
               ["few_shot_search", "few_shot"], few_shot, FEW_SHOT_ARMS),
]}
