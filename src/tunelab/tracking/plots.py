"""Matplotlib without a display: one place that opens and saves every PNG tunelab logs."""

from __future__ import annotations

from pathlib import Path


def figure(size: tuple[float, float], ncols: int = 1):
    """A (figure, axes) pair on the Agg backend (servers and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=size)


def save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lr_history(history: list[tuple[int, dict[str, float]]], boundaries: list[tuple[int, str]],
                    path: Path) -> Path:
    """One line per layer group (LR against optimizer step), dashed lines at stage starts."""
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
