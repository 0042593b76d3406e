"""What a run will train, when, at which LR: the table printed at start and logged to MLflow,
and the plot of every group's LR over the run with the stage boundaries."""

from __future__ import annotations


from tunelab.adapters import LayerGroup
from tunelab.engine.strategies import Stage


def stage_table(stages: list[Stage], groups: list[LayerGroup], sizes: dict[str, int],
                base_lr: float, layer_scale: dict[str, float]) -> str:
    """Rows: layer groups; columns: stages. A cell is the group's peak LR in that stage
    (base LR × stage multiplier × layer scale), ``frozen``, or ``*`` when only the
    parameters matching the stage's name patterns train."""
    names = [g.name for g in groups]
    width = max(len(n) for n in names + ["trainable"])
    heads = [f"{s.name}@{'<=' if s.plateau else ''}{'ep' if s.unit == 'epoch' else 'step'}{s.start}" for s in stages]
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
    lines += [f"{s.name} starts {s.plateau.describe(s.unit, s.start)}" for s in stages if s.plateau]
    return "\n".join(lines)
