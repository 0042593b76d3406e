"""Strategies are pure functions from group names to stages; schedules are pure shapes."""

from __future__ import annotations

import math

import pytest

from tunelab.engine.schedules import constant, warmup_cosine
from tunelab.errors import TunelabError
from tunelab.engine.strategies import (
    Stage, check_stages, freeze_unfreeze, full, linear_probe, stage_at, top_groups,
)

GROUPS = ["stem", "blocks.0", "blocks.1", "blocks.2", "head"]
PARAMS = {g: [f"{g}.conv.weight", f"{g}.bn.weight", f"{g}.bn.bias"] for g in GROUPS}


def test_full_trains_everything_from_step_zero():
    (stage,) = full(GROUPS)
    assert stage.start == 0 and stage.trainable == tuple(GROUPS)
    assert all(stage.mult(g) == 1.0 for g in GROUPS)


def test_linear_probe_trains_only_the_head():
    (stage,) = linear_probe(GROUPS)
    assert stage.trainable == ("head",)
    assert not stage.trains("stem", "stem.weight") and stage.trains("head", "head.weight")


def test_freeze_unfreeze_opens_top_groups_at_lower_lr():
    head, opened = freeze_unfreeze(GROUPS, head_epochs=2, unfreeze=2, lr_mult=0.1, head_lr_mult=0.5)
    assert head.trainable == ("head",) and head.start == 0
    assert opened.start == 2
    assert opened.trainable == ("blocks.1", "blocks.2", "head")
    assert opened.mult("blocks.2") == 0.1 and opened.mult("head") == 0.5 and "stem" not in opened.trainable


def test_freeze_unfreeze_all():
    _, opened = freeze_unfreeze(GROUPS, unfreeze="all")
    assert set(opened.trainable) == set(GROUPS)


@pytest.mark.parametrize("bad", [0, 5, -1, "some", True, 1.5])
def test_top_groups_rejects_bad_counts(bad):
    with pytest.raises(TunelabError, match="strategy.unfreeze"):
        top_groups(GROUPS, bad)


def test_head_epochs_must_be_positive():
    with pytest.raises(TunelabError, match="head_epochs"):
        freeze_unfreeze(GROUPS, head_epochs=0)


def test_stage_at_follows_epochs():
    stages = freeze_unfreeze(GROUPS, head_epochs=3)
    assert [stage_at(stages, e, 0) for e in range(6)] == [0, 0, 0, 1, 1, 1]


def test_check_stages_accepts_valid_schedule():
    check_stages(freeze_unfreeze(GROUPS, head_epochs=1), GROUPS, 2, PARAMS)


@pytest.mark.parametrize("stages,max_epochs,message", [
    (freeze_unfreeze(GROUPS, head_epochs=3), 3, "never run"),
    ([Stage("a", 0, ("head",)), Stage("b", 3, ("stem",), unit="step")], 5, "mix at_epoch and at_step"),
    ([Stage("a", 0, (), patterns=("nomatch",))], 5, "trains nothing"),
    ([Stage("a", 0, ("head",)), Stage("b", 0, ("stem",))], 5, "overlap"),
    ([Stage("a", 1, ("head",))], 5, "must start at 0"),
    ([Stage("a", 0, ("nope",))], 5, "unknown layer groups"),
    ([Stage("a", 0, ())], 5, "trains nothing"),
    ([Stage("a", 0, ("head",), {"head": 0.0})], 5, "> 0"),
    ([], 5, "no stages"),
])
def test_check_stages_rejects_impossible_schedules(stages, max_epochs, message):
    with pytest.raises(TunelabError, match=message):
        check_stages(stages, GROUPS, max_epochs, PARAMS)


def test_stage_table_lists_every_group_lrs_and_trainable_counts():
    from tunelab.adapters import LayerGroup
    from tunelab.engine.stage_report import stage_table

    groups = [LayerGroup(g, tuple(PARAMS[g])) for g in GROUPS]
    sizes = {n: 10 for g in GROUPS for n in PARAMS[g]}
    stages = freeze_unfreeze(GROUPS, unfreeze=1, lr_mult=0.1) + [Stage("bias", 2, (), patterns=(r"\.bias$",))]
    table = stage_table(stages, groups, sizes, base_lr=1e-3, layer_scale={g: 1.0 for g in GROUPS})
    lines = table.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:-2]}
    assert rows["stem"] == ["30", "frozen", "frozen", "1.00e-03*"]
    assert rows["blocks.2"] == ["30", "frozen", "1.00e-04", "1.00e-03*"]
    assert rows["head"] == ["30", "1.00e-03", "1.00e-03", "1.00e-03*"]
    assert lines[-2].split() == ["trainable", "150", "30", "(20.0%)", "60", "(40.0%)", "50", "(33.3%)"]
    assert lines[-1].startswith("* only parameters matching")


def test_warmup_cosine_shape():
    total = 100
    values = [warmup_cosine(s, total, warmup=10, min_lr_ratio=0.1) for s in range(total)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(values[:10], values[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # then decays
    assert warmup_cosine(total, total, warmup=10, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(55, total, warmup=0.1) == pytest.approx(0.5)  # fraction warmup, midpoint


def test_constant_shape_with_and_without_warmup():
    assert [constant(s, 50) for s in (0, 49)] == [1.0, 1.0]
    assert constant(0, 50, warmup=4) == 0.25 and constant(3, 50, warmup=4) == 1.0
    assert math.isclose(constant(10, 50, warmup=4), 1.0)


def test_one_cycle_matches_torch():
    import torch

    from tunelab.engine.schedules import one_cycle

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=50, pct_start=0.3)
    for step in range(50):
        assert one_cycle(step, 50, pct_start=0.3) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        if step < 49:
            sched.step()


def test_slanted_triangular_follows_ulmfit():
    from tunelab.engine.schedules import slanted_triangular

    total, cut_frac, ratio = 200, 0.1, 32
    cut = int(total * cut_frac)
    for t in range(total):  # eq. 3 of Howard & Ruder (2018)
        p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / cut_frac - 1))
        assert slanted_triangular(t, total, cut_frac, ratio) == pytest.approx((1 + p * (ratio - 1)) / ratio)
    assert slanted_triangular(cut, total) == pytest.approx(1.0)


def test_linear_decays_to_floor():
    from tunelab.engine.schedules import linear

    assert linear(0, 100, warmup=0) == 1.0 and linear(100, 100, warmup=0, min_lr_ratio=0.2) == pytest.approx(0.2)
    assert linear(50, 100, warmup=0) == pytest.approx(0.5)


def test_plateau_reduces_after_patience_and_round_trips():
    from tunelab.engine.schedules import Plateau

    plateau = Plateau(mode="min", factor=0.5, patience=2)
    for loss in (1.0, 0.9, 0.95, 0.91):  # best 0.9, then two bad validations
        plateau.update(loss)
    assert plateau.scale == 0.5 and plateau(10, 100) == 0.5
    restored = Plateau(mode="min", factor=0.5, patience=2)
    restored.load_state_dict(plateau.state_dict())
    assert restored.scale == 0.5 and restored.best == 0.9


def test_milestones_accept_counts_names_and_regexes():
    from tunelab.engine.strategies import milestones

    stages = milestones(GROUPS, [
        {"at_epoch": 1, "unfreeze": 1, "lr_mult": 0.5},
        {"at_epoch": 2, "unfreeze": ["stem"], "lr_mult": 0.1},
        {"at_epoch": 4, "unfreeze": r"blocks\.[01]", "lr_mult": 0.05},
    ])
    assert [s.start for s in stages] == [0, 1, 2, 4] and stages[0].trainable == ("head",)
    assert stages[1].trainable == ("blocks.2", "head")
    assert stages[2].trainable == ("stem", "blocks.2", "head") and stages[2].mult("blocks.2") == 0.5
    assert set(stages[3].trainable) == set(GROUPS) and stages[3].mult("blocks.0") == 0.05
    with pytest.raises(TunelabError, match=r"strategy.stages\[0\] needs at_epoch"):
        milestones(GROUPS, [{"unfreeze": 1}])


def test_gradual_opens_groups_from_the_top():
    from tunelab.engine.strategies import gradual

    stages = gradual(GROUPS, every=2, groups_per_stage=2)
    assert [s.start for s in stages] == [0, 2, 4]
    assert [s.trainable for s in stages] == [("head",), ("blocks.1", "blocks.2", "head"), tuple(GROUPS)]
    steps = gradual(GROUPS, every=10, unit="step")
    assert [s.start for s in steps] == [0, 10, 20, 30, 40] and steps[-1].unit == "step"
    assert stage_at(steps, 0, 25) == 2


def test_lp_ft_bitfit_regex_lora_selection():
    from tunelab.engine.strategies import bitfit, lora, lp_ft, regex

    probe, ft = lp_ft(GROUPS, probe_epochs=3, lr_mult=0.1)
    assert probe.trainable == ("head",) and ft.start == 3 and ft.mult("head") == 0.1
    (bias,) = bitfit(GROUPS)
    assert bias.trains("stem", "stem.bn.bias") and not bias.trains("stem", "stem.bn.weight")
    assert bias.trains("head", "head.weight")
    (norms,) = regex(GROUPS, [r"\.bn\."], include_head=False)
    assert norms.trains("blocks.0", "blocks.0.bn.weight") and not norms.trains("head", "head.weight")
    with pytest.raises(TunelabError, match="not a valid regex"):
        regex(GROUPS, ["("])
    (adapters,) = lora(GROUPS)
    assert adapters.trains("blocks.0", "blocks.0.attn.qkv.lora_A.default.weight")
    assert not adapters.trains("blocks.0", "blocks.0.attn.qkv.base_layer.weight")


def test_full_llrd_and_full_l2sp_compose_into_full_with_their_extra(cfg_factory):
    from tunelab.engine.build import build_parts
    from tunelab.engine.regularizers import L2SP

    tiny = ["model.arch=test_efficientnet", "model.pretrained=false", "data.image_size=32", "data.max_train_samples=32",
            "retention.enabled=false"]
    llrd = build_parts(cfg_factory(*tiny, "strategy=full_llrd"))
    names = llrd.adapter.group_names  # bottom to head
    assert [llrd.module.layer_scale[g] for g in names] == pytest.approx([0.7 ** (len(names) - 1 - i)
                                                                          for i in range(len(names))])
    assert llrd.module.regularizer is None and [s.trainable for s in llrd.stages] == [tuple(llrd.adapter.group_names)]
    l2sp = build_parts(cfg_factory(*tiny, "strategy=full_l2sp"))
    assert isinstance(l2sp.module.regularizer, L2SP) and set(l2sp.module.layer_scale.values()) == {1.0}
    assert l2sp.stages[0].trainable == llrd.stages[0].trainable
