"""Freezing strategies as data: a pure function from layer-group names to a list of Stages.

A Stage says from which epoch which groups train and at what LR multiplier. The
StageCallback applies them; the optimizer holds every group from step 0, so a stage
change only flips ``requires_grad`` and multipliers (see DESIGN.md).
A new strategy is a new function here plus a YAML file in ``conf/strategy/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.errors import TunelabError


@dataclass(frozen=True)
class Stage:
    name: str
    start_epoch: int
    trainable: tuple[str, ...]  # layer-group names that receive gradients in this stage
    lr_mult: dict[str, float] = field(default_factory=dict)  # per trainable group; missing = 1.0

    def mult(self, group: str) -> float:
        return self.lr_mult.get(group, 1.0) if group in self.trainable else 0.0


def full(groups: list[str], lr_mult: float = 1.0) -> list[Stage]:
    """Everything trains from the first step."""
    return [Stage("full", 0, tuple(groups), {g: lr_mult for g in groups})]


def linear_probe(groups: list[str]) -> list[Stage]:
    """Only the new head trains; the pretrained backbone stays exactly as loaded."""
    return [Stage("head", 0, ("head",))]


def top_groups(groups: list[str], unfreeze: int | str) -> tuple[str, ...]:
    """The head plus the top ``unfreeze`` backbone groups (``"all"`` for every group)."""
    backbone = [g for g in groups if g != "head"]
    if unfreeze == "all":
        return tuple(groups)
    if isinstance(unfreeze, bool) or not isinstance(unfreeze, int) or not 1 <= unfreeze <= len(backbone):
        raise TunelabError(
            f"strategy.unfreeze must be 'all' or an integer in 1..{len(backbone)} "
            f"(backbone groups of this model), got {unfreeze!r}."
        )
    return tuple(backbone[len(backbone) - unfreeze:]) + ("head",)


def freeze_unfreeze(
    groups: list[str], head_epochs: int = 1, unfreeze: int | str = "all",
    lr_mult: float = 0.1, head_lr_mult: float = 1.0,
) -> list[Stage]:
    """Train the head for ``head_epochs``, then also the top ``unfreeze`` groups at ``lr_mult``."""
    if head_epochs < 1:
        raise TunelabError(f"strategy.head_epochs must be >= 1, got {head_epochs}; use strategy=full to train everything at once.")
    opened = top_groups(groups, unfreeze)
    mults = {g: (head_lr_mult if g == "head" else lr_mult) for g in opened}
    return [Stage("head", 0, ("head",)), Stage("unfreeze", head_epochs, opened, mults)]


def check_stages(stages: list[Stage], groups: list[str], max_epochs: int) -> None:
    """Reject a schedule that cannot run as written, before any training."""
    if not stages:
        raise TunelabError("the strategy produced no stages.")
    if stages[0].start_epoch != 0:
        raise TunelabError(f"the first stage must start at epoch 0, not {stages[0].start_epoch}.")
    for prev, nxt in zip(stages, stages[1:]):
        if nxt.start_epoch <= prev.start_epoch:
            raise TunelabError(f"stages overlap: {nxt.name!r} starts at epoch {nxt.start_epoch}, not after {prev.name!r} (epoch {prev.start_epoch}).")
    for stage in stages:
        unknown = [g for g in stage.trainable if g not in groups]
        if unknown:
            raise TunelabError(f"stage {stage.name!r} names unknown layer groups {unknown}; this model has {groups}.")
        if not stage.trainable:
            raise TunelabError(f"stage {stage.name!r} trains nothing.")
        bad = {g: m for g, m in stage.lr_mult.items() if not m > 0}
        if bad:
            raise TunelabError(f"stage {stage.name!r}: LR multipliers must be > 0, got {bad}.")
    last = stages[-1]
    if last.start_epoch >= max_epochs:
        raise TunelabError(
            f"stage {last.name!r} starts at epoch {last.start_epoch} but trainer.max_epochs={max_epochs}, "
            f"so it would never run. Raise trainer.max_epochs above {last.start_epoch} or start it earlier."
        )


def stage_at(stages: list[Stage], epoch: int) -> int:
    """Index of the stage in force at ``epoch``."""
    return max(i for i, s in enumerate(stages) if s.start_epoch <= epoch)


def stage_table(stages: list[Stage], groups: list[str], params_per_group: dict[str, int]) -> str:
    """Plain-text table (printed and logged to MLflow) of what trains when, at which LR multiplier."""
    width = max(len(g) for g in groups)
    header = f"{'group':<{width}}  {'params':>10}  " + "  ".join(f"{s.name}@ep{s.start_epoch:<3}" for s in stages)
    lines = [header, "-" * len(header)]
    for g in groups:
        cells = "  ".join(f"{('x' + format(s.mult(g), '.3g')) if g in s.trainable else 'frozen':<{len(s.name) + 6}}" for s in stages)
        lines.append(f"{g:<{width}}  {params_per_group[g]:>10,}  {cells}")
    trainable = [sum(params_per_group[g] for g in s.trainable) for s in stages]
    lines.append(f"{'trainable':<{width}}  {sum(params_per_group.values()):>10,}  "
                 + "  ".join(f"{n:<{len(s.name) + 6},}" for n, s in zip(trainable, stages)))
    return "\n".join(lines)
