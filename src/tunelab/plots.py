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
