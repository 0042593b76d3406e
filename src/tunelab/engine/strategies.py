"""Freezing strategies as data: a pure function from layer-group names to a list of Stages.

A Stage says from which epoch (or optimizer step) which groups train, which extra
parameters train by name pattern, and at what LR multiplier. The StageCallback applies
them; the optimizer holds every group from step 0, so a stage change only flips
``requires_grad`` and multipliers (see docs/fine-tuning.md).
A new strategy is a new function here plus a YAML file in ``conf/strategy/``.
Staged ones take ``plateau`` (engine/plateau.py): later stages start when a metric plateaus.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated

from tunelab.config.settings import BOOL, POSITIVE, Rule, checked, choice, expect, integer, string_list
from tunelab.engine.plateau import PLATEAU, Plateau, on_plateau
from tunelab.errors import TunelabError

COUNT = integer(1)
MULT = Rule(POSITIVE.ok, "a number > 0 (a multiplier of optimizer.lr)")
UNITS = ("epoch", "step")
BIAS = r"(^|\.)bias$"
LORA = r"\.lora_(A|B|embedding_A|embedding_B)\."


@dataclass(frozen=True)
class Stage:
    name: str
    start: int  # the epoch (or optimizer step, when unit == "step") at which the stage begins
    trainable: tuple[str, ...]  # layer groups trained whole
    lr_mult: dict[str, float] = field(default_factory=dict)  # per group; missing = 1.0
    patterns: tuple[str, ...] = ()  # parameter-name regexes trained in addition (BitFit, LoRA...)
    unit: str = "epoch"
    frozen: tuple[str, ...] = ()  # groups that never train whatever the above says (see keep_frozen)
    origin: str = field(default="", compare=False)  # the setting that placed its start, for messages
    plateau: Plateau | None = None  # set: starts when a metric plateaus, ``start`` at the latest (plateau.py)

    def started_by(self) -> str:
        return f" (set by {self.origin})" if self.origin else ""

    def mult(self, group: str) -> float:
        return self.lr_mult.get(group, 1.0)

    def trains(self, group: str, param_name: str) -> bool:
        if group in self.frozen:
            return False
        return group in self.trainable or any(re.search(p, param_name) for p in self.patterns)


def keep_frozen(stages: list[Stage], groups: Sequence[str]) -> list[Stage]:
    """The same schedule with ``groups`` frozen in every stage (an adapter's always-frozen
    groups, such as a speech model's convolutional feature encoder)."""
    if not groups:
        return stages
    return [replace(s, frozen=tuple(groups)) for s in stages]


def _backbone(groups: Sequence[str]) -> list[str]:
    return [g for g in groups if g != "head"]


@checked("strategy")
def full(groups: list[str], lr_mult: Annotated[float, MULT] = 1.0) -> list[Stage]:
    """Everything trains from the first step."""
    return [Stage("full", 0, tuple(groups), {g: lr_mult for g in groups})]


def linear_probe(groups: list[str]) -> list[Stage]:
    """Only the new head trains; the pretrained backbone stays exactly as loaded."""
    return [Stage("head", 0, ("head",))]


def top_groups(groups: list[str], unfreeze: int | str, key: str = "strategy.unfreeze") -> tuple[str, ...]:
    """The head plus the top ``unfreeze`` backbone groups (``"all"`` for every group)."""
    backbone = _backbone(groups)
    if unfreeze == "all":
        return tuple(groups)
    if isinstance(unfreeze, bool) or not isinstance(unfreeze, int) or not 1 <= unfreeze <= len(backbone):
        raise TunelabError(
            f"{key} must be 'all' or an integer in 1..{len(backbone)} "
            f"(backbone groups of this model), got {unfreeze!r}."
        )
    return tuple(backbone[len(backbone) - unfreeze:]) + ("head",)


def select_groups(groups: list[str], unfreeze, key: str) -> tuple[str, ...]:
    """``unfreeze`` as top-N count, ``"all"``, a list of group names, or a regex over names."""
    if isinstance(unfreeze, int) or unfreeze == "all":
        return top_groups(groups, unfreeze, key)
    if isinstance(unfreeze, str):
        try:
            chosen = tuple(g for g in groups if re.fullmatch(unfreeze, g))
        except re.error as err:
            raise TunelabError(f"{key}: {unfreeze!r} is not a valid regex ({err}).") from None
        if not chosen:
            raise TunelabError(f"{key}: regex {unfreeze!r} matches no layer group of {groups}.")
        return chosen
    if not isinstance(unfreeze, Sequence) or not unfreeze or not all(isinstance(g, str) for g in unfreeze):
        raise TunelabError(f"{key} must be 'all', a count of top groups, a regex or a non-empty list of group "
                           f"names, got {_shown(unfreeze)}.")
    unknown = [g for g in unfreeze if g not in groups]
    if unknown:
        raise TunelabError(f"{key} names unknown layer groups {unknown}; this model has {groups}.")
    return tuple(g for g in groups if g in set(unfreeze))


def _shown(value) -> str:
    """A config value as the user wrote it (ListConfig / DictConfig as plain lists and dicts)."""
    try:
        from omegaconf import OmegaConf

        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    return "null" if value is None else repr(value)


def _count(value, key: str, low: int) -> int:
    return expect(value, integer(low), key)


def _mult(value, key: str) -> float:
    return float(expect(value, MULT, key))


@checked("strategy")
def freeze_unfreeze(
    groups: list[str], head_epochs: Annotated[int, COUNT] = 1, unfreeze: int | str = "all",
    lr_mult: Annotated[float, MULT] = 0.1, head_lr_mult: Annotated[float, MULT] = 1.0,
    plateau: Annotated[dict | None, PLATEAU] = None,
) -> list[Stage]:
    """Train the head for ``head_epochs`` (strategy=full trains everything at once), then also the
    top ``unfreeze`` groups at ``lr_mult``."""
    opened = top_groups(groups, unfreeze)
    mults = {g: (head_lr_mult if g == "head" else lr_mult) for g in opened}
    return on_plateau([Stage("head", 0, ("head",)),
                       Stage("unfreeze", head_epochs, opened, mults, origin=f"strategy.head_epochs={head_epochs}")],
                      plateau)


def milestones(groups: list[str], stages: list[dict], plateau: Annotated[dict | None, PLATEAU] = None) -> list[Stage]:
    """Any number of stages, each opening more groups: ``[{at_epoch|at_step, unfreeze, lr_mult}]``.

    ``unfreeze`` is a top-N count, ``"all"``, a list of group names or a regex over names; what
    a milestone opens stays open, at the ``lr_mult`` it was opened with. The head always trains;
    without a milestone at 0, the run starts with the head alone.
    """
    if not stages:
        raise TunelabError("strategy.stages is empty: give at least one {at_epoch, unfreeze, lr_mult}.")
    if isinstance(stages, (str, Mapping)) or not isinstance(stages, Sequence):
        raise TunelabError(f"strategy.stages must be a list of {{at_epoch, unfreeze, lr_mult}}, got {_shown(stages)}.")
    result: list[Stage] = []
    opened: dict[str, float] = {"head": 1.0}
    previous: tuple[str, int] | None = None
    for i, spec in enumerate(stages):
        where = f"strategy.stages[{i}]"
        if not isinstance(spec, Mapping):
            raise TunelabError(f"{where} must be a mapping like {{at_epoch: 1, unfreeze: 2, lr_mult: 0.1}}, "
                               f"got {_shown(spec)}.")
        spec = {str(k): v for k, v in spec.items()}
        unit = "step" if "at_step" in spec else "epoch"
        start = spec.pop("at_step" if unit == "step" else "at_epoch", None)
        unknown = set(spec) - {"unfreeze", "lr_mult", "head_lr_mult", "name"}
        if start is None or unknown:
            raise TunelabError(
                f"{where} needs at_epoch or at_step, and only unfreeze, lr_mult, "
                f"head_lr_mult, name (got {sorted(unknown) or 'no start'})."
            )
        at = f"{where}.at_{unit}"
        start = _count(start, at, 0)
        if previous is not None and previous[0] != at.rsplit(".", 1)[1]:
            raise TunelabError(f"{at}: every stage must use the same unit, but strategy.stages[{i - 1}] uses "
                               f"{previous[0]}; use at_epoch or at_step throughout.")
        if previous is not None and start <= previous[1]:
            raise TunelabError(f"{at}={start} must be later than strategy.stages[{i - 1}].{previous[0]}={previous[1]}: "
                               "list the stages in the order they start, each after the one before.")
        previous = (f"at_{unit}", start)
        if i == 0 and start > 0:
            result.append(Stage("head", 0, ("head",), unit=unit))
        mult = _mult(spec.get("lr_mult", 1.0), f"{where}.lr_mult")
        for g in select_groups(groups, spec.get("unfreeze", "all"), f"{where}.unfreeze"):
            opened.setdefault(g, mult)
        if "head_lr_mult" in spec:
            opened["head"] = _mult(spec["head_lr_mult"], f"{where}.head_lr_mult")
        name = spec.get("name", f"stage{len(result)}")
        if not isinstance(name, str) or not name:
            raise TunelabError(f"{where}.name must be a non-empty string, got {_shown(name)}.")
        result.append(Stage(name, start, tuple(g for g in groups if g in opened), dict(opened), unit=unit,
                            origin=f"{at}={start}"))
    return on_plateau(result, plateau)


@checked("strategy")
def gradual(
    groups: list[str], every: Annotated[int, COUNT] = 1, unit: Annotated[str, choice(*UNITS)] = "epoch",
    groups_per_stage: Annotated[int, COUNT] = 1, lr_mult: Annotated[float, MULT] = 1.0,
    plateau: Annotated[dict | None, PLATEAU] = None,
) -> list[Stage]:
    """ULMFiT's gradual unfreezing: head first, then ``groups_per_stage`` more groups from the
    top every ``every`` epochs (or steps), until everything trains."""
    backbone = _backbone(groups)
    stages = [Stage("head", 0, ("head",), unit=unit)]
    for k in range(groups_per_stage, len(backbone) + groups_per_stage, groups_per_stage):
        opened = tuple(backbone[max(0, len(backbone) - k):]) + ("head",)
        stages.append(Stage(f"top{min(k, len(backbone))}", every * len(stages), opened,
                            {g: lr_mult for g in opened if g != "head"}, unit=unit,
                            origin=f"strategy.every={every}, strategy.groups_per_stage={groups_per_stage}"))
    return on_plateau(stages, plateau)


@checked("strategy")
def lp_ft(groups: list[str], probe_epochs: Annotated[int, COUNT] = 2, lr_mult: Annotated[float, MULT] = 0.1,
          probe_lr_mult: Annotated[float, MULT] = 1.0, plateau: Annotated[dict | None, PLATEAU] = None) -> list[Stage]:
    """LP-FT (Kumar et al. 2022): linear probe, then fine-tune everything, head included,
    at a lower LR, so the probed head does not distort the pretrained features."""
    return on_plateau([Stage("probe", 0, ("head",), {"head": probe_lr_mult}),
                       Stage("finetune", probe_epochs, tuple(groups), {g: lr_mult for g in groups},
                             origin=f"strategy.probe_epochs={probe_epochs}")], plateau)


def bitfit(groups: list[str]) -> list[Stage]:
    """BitFit (Ben Zaken et al. 2022): only bias terms, plus the new head."""
    return [Stage("bitfit", 0, ("head",), patterns=(BIAS,))]


@checked("strategy")
def regex(groups: list[str], patterns: Annotated[list[str], string_list()],
          include_head: Annotated[bool, BOOL] = True) -> list[Stage]:
    """Train the parameters whose names match any of ``patterns`` (re.search), plus the head."""
    for p in patterns:
        try:
            re.compile(p)
        except re.error as err:
            raise TunelabError(f"strategy.patterns: {p!r} is not a valid regex ({err}).") from None
    return [Stage("regex", 0, ("head",) if include_head else (), patterns=tuple(patterns))]


def lora(groups: list[str]) -> list[Stage]:
    """LoRA: the adapters injected by ``lora:`` (see conf/strategy/lora.yaml) and the head train."""
    return [Stage("lora", 0, ("head",), patterns=(LORA,))]


def check_stages(stages: list[Stage], groups: list[str], max_epochs: int, param_names: dict[str, list[str]]) -> None:
    """Reject a schedule that cannot run as written, before any training.

    ``param_names`` maps each group to its parameter names, so a pattern that selects
    nothing (a typo) is an error instead of a silently frozen model.
    """
    if not stages:
        raise TunelabError("the strategy produced no stages.")
    if stages[0].start != 0:
        raise TunelabError(f"the first stage must start at 0, not {stages[0].start}.")
    if len({s.unit for s in stages}) > 1:
        raise TunelabError("stages mix at_epoch and at_step starts; use one unit per schedule.")
    for prev, nxt in zip(stages, stages[1:]):
        if nxt.start <= prev.start:
            raise TunelabError(f"stages overlap: {nxt.name!r}{nxt.started_by()} starts at {nxt.unit} {nxt.start}, "
                               f"not after {prev.name!r}{prev.started_by()} ({prev.unit} {prev.start}).")
    for stage in stages:
        unknown = [g for g in stage.trainable if g not in groups]
        if unknown:
            raise TunelabError(f"stage {stage.name!r} names unknown layer groups {unknown}; this model has {groups}.")
        count = sum(stage.trains(g, n) for g in groups for n in param_names[g])
        if count == 0:
            raise TunelabError(f"stage {stage.name!r} trains nothing: no group and no parameter name matches {list(stage.patterns)}.")
        bad = {g: m for g, m in stage.lr_mult.items() if not m > 0}
        if bad:
            raise TunelabError(f"stage {stage.name!r}: LR multipliers must be > 0, got {bad}.")
    last = stages[-1]
    if last.unit == "epoch" and last.start >= max_epochs:
        raise TunelabError(
            f"stage {last.name!r}{last.started_by()} starts at epoch {last.start} but trainer.max_epochs={max_epochs}, "
            f"so it would never run. Raise trainer.max_epochs above {last.start} or start it earlier."
        )


def fits(stages: list[Stage], max_epochs: int, steps_per_epoch: int) -> bool:
    """Whether the last stage starts within the run (check_stages says why when it does not)."""
    last = stages[-1]
    return last.start < (max_epochs if last.unit == "epoch" else max_epochs * steps_per_epoch)


def compress(stages: list[Stage], max_epochs: int, steps_per_epoch: int, why: str) -> tuple[list[Stage], int]:
    """A schedule that does not fit a short run, squeezed so every stage still runs: stage i
    starts at optimizer step i, and the run gets as many epochs as that needs. What a smoke run
    must exercise is each stage change, not each stage's length."""
    if fits(stages, max_epochs, steps_per_epoch):
        return stages, max_epochs
    squeezed = [replace(s, start=i, unit="step", origin=f"{why}; was {s.unit} {s.start}") for i, s in enumerate(stages)]
    return squeezed, max(max_epochs, math.ceil(len(stages) / steps_per_epoch))


def stage_at(stages: list[Stage], epoch: int, step: int) -> int:
    """Index of the stage in force at ``epoch`` / optimizer ``step``."""
    return max(i for i, s in enumerate(stages) if s.start <= (step if s.unit == "step" else epoch))
