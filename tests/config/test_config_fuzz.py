"""Fuzzing config validation: random override lists over real keys never crash with anything
but a clear error.

Property: composing the overrides (Hydra) and then ``check_config`` + ``build_parts`` either
returns ``Parts`` (a runnable plan) or raises ``TunelabError`` / Hydra's own composition errors
with a one-line message; never KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError...
Crashes found this way (against the code before this test existed: TypeError / ValueError from
int(), float(), comparisons, numpy seeds and unexpected keyword arguments; omegaconf's
ConfigAttributeError for ``~data`` / ``~strategy``; three-line "cannot build" messages) are fixed at
the source and pinned as explicit regressions in tests/cli/test_bad_input.py::test_values_that_used_to_crash.

Left out of the vocabulary on purpose: ``<group>=null`` (Hydra itself raises a plain ValueError;
see test_bad_input.py::test_cli_group_set_to_null_is_one_line) and data sets that synthesise or
read large data (spoken_digits, audio). Building parts reads MNIST-5k once per example (~0.3 s).
"""

from __future__ import annotations

import pytest
from conftest import compose_cfg
from helpers.cli_inprocess import run_train
from hydra.errors import HydraException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.engine.build import Parts, build_parts
from tunelab.errors import TunelabError

BASE = ["model.arch=test_efficientnet", "model.pretrained=false", "retention.enabled=false"]
IMAGE_BASE = [*BASE, "data.image_size=32", "data.max_train_samples=64"]

KEYS = [  # settings of the default choices (and of every data / model choice used below)
    "optimizer.lr", "optimizer.weight_decay", "trainer.max_epochs", "trainer.limit_train_batches",
    "data.batch_size", "data.eval_batch_size", "data.max_train_samples", "data.samples_per_class",
    "data.min_epoch_samples", "data.num_classes",
    "data.val_fraction", "data.test_fraction", "data.num_workers", "data.task", "data.objective", "data.seed",
    "module.layer_decay", "module.batchnorm", "data.sampler", "module.stage_rewarmup",
    "module.group_lr_mults", "perf.cache_features", "perf.compile", "perf.channels_last", "seed",
    "retention.samples", "model.drop_rate",
]
IMAGE_KEYS = ["data.image_size", "data.augment"]


def _settings_of(group: str) -> dict[str, list[str]]:
    """``strategy.*`` / ``scheduler.*`` / ``regularizer.*`` keys each choice has (read from conf/)."""
    from omegaconf import OmegaConf

    from tunelab.config import conf_dir

    found = {}
    for file in sorted((conf_dir() / group).glob("*.yaml")):
        node = OmegaConf.load(file)
        node = node.get(group, node) if "_target_" not in node else node  # strategy=lora nests itself
        found[file.stem] = [f"{group}.{k}" for k in (node or {}) if not str(k).startswith("_")]
    return found


GROUP_KEYS = {group: _settings_of(group) for group in ("strategy", "scheduler", "regularizer", "loss")}
GROUP_KEYS["strategy"]["lora"] = ["lora.r", "lora.alpha", "lora.dropout", "lora.target_modules"]  # its own node
DEFAULTS = {"strategy": "freeze_unfreeze", "scheduler": "warmup_cosine", "regularizer": "none", "loss": "auto"}
CHOICES = {
    "model": ["efficientnet_lite0", "resnet18", "resnet1000"],
    "data": ["mnist5k", "image_folder", "image_csv", "text_table", "drug_reviews", "no_such_data"],
    "strategy": ["freeze_unfreeze", "full", "linear_probe", "milestones", "gradual", "lp_ft", "bitfit", "regex",
                 "lora", "nope"],
    "optimizer": ["adamw", "sgd", "rmsprop"],
    "scheduler": ["warmup_cosine", "constant", "linear", "one_cycle", "slanted_triangular", "plateau", "step"],
    "regularizer": ["none", "l2sp"],
    "loss": [*GROUP_KEYS["loss"], "nope"],  # every shipped choice, read from conf/loss/
}
LITERALS = [
    "0", "-1", "1", "2", "3", "1e-3", "-1e-3", "0.5", "1.5", "2.0", "1e400", "-1e400", "inf", "nan", "null", "true",
    "false", "abc", "''", "'5'", "[]", "[1,2]", "[abc]", "{}", "{a: 1}", "{head: -1}", "{head: 0.5}", "all",
    "epoch", "step", "auto", "eval", "train", "min", "max", "balanced", "shuffle", "[1.0, 2.0]", "val/acc", "${seed}", "${nope}", "10000000000000000000000",
    "[{at_epoch: 1, unfreeze: 2}]", "['bias']", "['(']", "regression",
]


def _stages(draw) -> str:
    """A milestones list: in or out of order, mixed units, odd values."""
    items = []
    for _ in range(draw(st.integers(0, 3))):
        unit = draw(st.sampled_from(["at_epoch", "at_epoch", "at_step", "at_when"]))
        start = draw(st.sampled_from(["0", "1", "2", "5", "-1", "abc", "1.5"]))
        unfreeze = draw(st.sampled_from(["", ", unfreeze: 2", ", unfreeze: all", ", unfreeze: 99", ", unfreeze: '('",
                                         ", unfreeze: [head]", ", unfreeze: [nope]", ", unfreeze: 1.5"]))
        mult = draw(st.sampled_from(["", ", lr_mult: 0.1", ", lr_mult: 0", ", lr_mult: abc", ", head_lr_mult: -1"]))
        items.append(f"{{{unit}: {start}{unfreeze}{mult}}}")
    return f"[{', '.join(items)}]"


@st.composite
def values(draw) -> str:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return str(draw(st.integers(-3, 12)))
    if kind == 1:
        return repr(draw(st.floats(-2, 4, allow_nan=False, allow_infinity=False)))
    if kind == 2:
        return _stages(draw)
    return draw(st.sampled_from(LITERALS))


@st.composite
def misspelt(draw, keys: list[str]) -> str:
    key = draw(st.sampled_from(keys))
    group, _, name = key.rpartition(".")
    i = draw(st.integers(0, max(0, len(name) - 1)))
    name = draw(st.sampled_from([name[:i] + name[i + 1:], name[:i] + name[i] + name[i:], name + "s"])) or "x"
    return f"{'+' if draw(st.booleans()) else ''}{group + '.' if group else ''}{name}"


@st.composite
def overrides(draw) -> list[str]:
    """Group choices, then mostly keys the composed config has (so the values reach tunelab's
    checks), sometimes misspelt ones or any key with ``+``/``++``."""
    result, chosen = [], dict(DEFAULTS)
    for group, options in CHOICES.items():
        if draw(st.integers(0, 3)) == 0:
            choice = draw(st.sampled_from([*options, "~"]))
            result.append(f"~{group}" if choice == "~" else f"{group}={choice}")
            chosen[group] = choice
    image = chosen.get("data", "mnist5k") in ("mnist5k", "image_folder", "image_csv", "no_such_data")
    own = [k for g in GROUP_KEYS for k in GROUP_KEYS[g].get(chosen[g], [])]
    keys = [*KEYS, *own, *(IMAGE_KEYS if image else [])]
    for _ in range(draw(st.integers(1, 4))):
        roll = draw(st.integers(0, 9))
        if roll < 7:
            key = draw(st.sampled_from(keys))
        elif roll < 9:
            key = draw(misspelt(keys))
        else:
            key = draw(st.sampled_from(["+", "++"])) + draw(st.sampled_from([*keys, "strategy.stages",
                                                                              "module.bogus", "data.bogus"]))
        result.append(f"{key}={draw(values())}")
    return [*(IMAGE_BASE if image else BASE), *result]


def one_clear_line(message: str) -> bool:
    return bool(message.strip()) and "Traceback" not in message and len(message) < 2000


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=overrides())
def test_any_override_list_is_a_plan_or_a_clear_error(tmp_path, monkeypatch, args):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        cfg = compose_cfg(tmp_path, args)
    except HydraException as err:  # Hydra's composition / parse errors: what tunelab-train prints, exit 1
        assert one_clear_line(str(err)), str(err)
        return
    try:
        parts = build_parts(cfg)
    except TunelabError as err:
        assert "\n" not in str(err) and one_clear_line(str(err)), str(err)
        return
    assert isinstance(parts, Parts)


# -- through the command line: exit 2 (tunelab) or 1 (Hydra), one line, no traceback -----------

NASTY = [
    (["trainer.max_epochs=1e400"], 2, "trainer.max_epochs must be an integer >= 1, got inf."),
    (["optimizer.lr=${nope}"], 2, "optimizer.lr: cannot resolve its value: Interpolation key 'nope' not found."),
    (["strategy=milestones", "strategy.stages=[{at_epoch: 2}, {at_step: 1}]"], 2,
     "strategy.stages[1].at_step: every stage must use the same unit"),
    (["+module.layer_decy=0.5"], 2, "module.layer_decy is not a module setting"),
    (["optimizer.lr=[1,"], 2, "no viable alternative at input '[1,'"),
]


@pytest.mark.parametrize("args,code,message", NASTY, ids=[" ".join(a) for a, _, _ in NASTY])
def test_nasty_overrides_on_the_command_line(tmp_path, args, code, message):
    result = run_train(tmp_path, "debug=smoke", *IMAGE_BASE, *args)  # main() in-process: nothing trains
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert message in result.stderr
    assert not list(tmp_path.rglob("mlflow.db")) and not list(tmp_path.rglob("*.ckpt"))
