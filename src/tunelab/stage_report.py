"""What a run will train, when, at which LR: the table printed at start and logged to MLflow,
and the plot of every group's LR over the run with the stage boundaries."""

from __future__ import annotations

from pathlib import Path

from tunelab.adapters import LayerGroup
from tunelab.strategies import Stage


def stage_table(stages: list[Stage], groups: list[LayerGroup], sizes: dict[str, int],
                base_lr: float, layer_scale: dict[str, float]) -> str:
    """Rows: layer groups; columns: stages. A cell is the group's peak LR in that stage
    (base LR × stage multiplier × layer scale), ``frozen``, or ``*`` when only the
    parameters matching the stage's name patterns train."""
    names = [g.name for g in groups]
    width = max(len(n) for n in names + ["trainable"])
    heads = [f"{s.name}@{'ep' if s.unit == 'epoch' else 'step'}{s.start}" for s in stages]
    cols = [max(len(h), 16) for h in heads]
    lines = [f"{'group':<{width}}  {'params':>10}  " + "  ".join(f"{h:<{c}}" for h, c in zip(heads, cols))]
    lines.append("-" * len(lines[0]))
    total = sum(sizes.values())
    trained = [0] * len(stages)
    for g in groups:
        cells = []
        for i, s in enumerate(stages):
            count = sum(sizes[n] for n in g.param_names if s.trains(g.name, n))
            trained[i] += count
            partial = "*" if 0 < count < sum(sizes[n] for n in g.param_names) else ""
            lr = base_lr * s.mult(g.name) * layer_scale[g.name]
            cells.append(f"{lr:.2e}{partial}" if count else "frozen")
        lines.append(f"{g.name:<{width}}  {sum(sizes[n] for n in g.param_names):>10,}  "
                     + "  ".join(f"{c:<{w}}" for c, w in zip(cells, cols)))
    lines.append(f"{'trainable':<{width}}  {total:>10,}  "
                 + "  ".join(f"{f'{n:,} ({100 * n / total:.1f}%)':<{w}}" for n, w in zip(trained, cols)))
    if any(s.patterns for s in stages):
        lines.append("* only parameters matching " + " | ".join(sorted({p for s in stages for p in s.patterns})))
    return "\n".join(lines)


def plot_lr_history(history: list[tuple[int, dict[str, float]]], boundaries: list[tuple[int, str]],
                    path: Path) -> Path:
    """One line per layer group (LR against optimizer step), dashed lines at stage starts."""
    from tunelab.plots import figure, save

    steps = [step for step, _ in history]
    groups = list(history[0][1]) if history else []
    fig, ax = figure((10, 4.5))
    for g in groups:
        ax.plot(steps, [lrs[g] for _, lrs in history], label=g, linewidth=1.2, drawstyle="steps-post")
    for step, name in boundaries:
        ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(name, (step, 1.0), xycoords=("data", "axes fraction"), rotation=90, va="top", fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("LR per layer group (0 = frozen)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save(fig, path)


def plot_confusion(matrix, classes: list[str], path: Path) -> Path:
    """Test-set confusion matrix: counts, rows = true class, columns = predicted."""
    from tunelab.plots import figure, save

    n = len(classes)
    fig, ax = figure((min(12, 2 + 0.5 * n), min(12, 1.6 + 0.5 * n)))
    ax.imshow(matrix, cmap="Blues")
    names = [c[:14] for c in classes]
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    if n <= 20:
        peak = max(int(matrix.max()), 1)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(matrix[i][j]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i][j] > peak / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("test confusion matrix")
    return save(fig, path)
