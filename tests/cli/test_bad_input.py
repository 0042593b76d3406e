"""Bad input gets ONE actionable line (which key, what was expected, what was given) before any
training starts, never a traceback; nothing half-written (MLflow run, checkpoint) is left behind.

Covered elsewhere, not repeated here:
- tests/cli/test_train.py::test_cli_bad_input_exits_nonzero_with_one_clear_line: unknown group choice
  (model=no_such_model, Hydra's "Could not find ... Available options"), misspelt key without ``+``
  (optimizer.lrr, Hydra's "Could not override"), data.source.root unset / missing, unknown timm arch.
- tests/cli/test_train.py::test_bad_config_fails_before_any_run: optimizer.lr=0, strategy.head_epochs past
  trainer.max_epochs (no mlflow.db); test_cli_num_classes_smaller_than_labels (image folder, CLI).
- tests/data/test_data.py: missing data paths, a folder without class folders, unreadable image at load.
- tests/engine/test_strategies.py::test_check_stages_rejects_impossible_schedules: hand-made Stage lists.

Here: the rest, through the real config tree. A few run ``tunelab-train`` as a user would (~8 s
each); the others call ``train(cfg)`` in-process, which fails in the same place (before the MLflow
run is opened) for a fraction of the cost.

Corrupt images: the data scan opens every image file (PIL ``verify``) when there are at most
``VERIFY_LIMIT`` (20,000) of them, so a corrupt file fails before training and is named; above that,
or with ``+data.source.verify=false``, the first load names the file, in one line even from inside a
DataLoader worker (``ItemError``). A CSV row with a missing cell is skipped, with a logged count.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_cfg, path_table, run_cli, write_image_folder, write_text_csv
from helpers.cli_inprocess import run_train
from helpers.runs import IMAGE, TINY_MODEL as TINY, nothing_written

from tunelab.config import build
from tunelab.errors import TunelabError

def fails_in_process(tmp_path: Path, overrides: list[str], pattern: str) -> str:
    """``train(cfg)`` as ``tunelab-train`` calls it: raises one line, before any run exists."""
    from tunelab.cli.train import train

    cfg = compose_cfg(tmp_path, overrides)
    with pytest.raises(TunelabError, match=pattern) as caught:
        train(cfg)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    nothing_written(tmp_path)
    return message


def fails_on_cli(tmp_path: Path, args: list[str], expected: str, process: bool = False) -> str:
    """``tunelab-train`` refuses ``args`` with one line, exit 2, nothing written: its main() in this
    process, or with ``process`` as a user runs it."""
    result = (run_cli if process else run_train)(tmp_path, "debug=smoke", *args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("tunelab-train: error: ")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
    nothing_written(tmp_path)
    return errors[0]


# -- the config, as a user runs it -------------------------------------------------------------

def test_cli_wrong_type_is_one_line_before_any_run(tmp_path):
    fails_on_cli(tmp_path, [*IMAGE, "trainer.max_epochs=abc"],
                 "tunelab-train: error: trainer.max_epochs must be an integer >= 1, got 'abc'.", process=True)


def test_cli_schedule_past_the_last_epoch_names_both_settings(tmp_path):
    # compress_stages=false: debug=smoke would otherwise squeeze the schedule into the run
    fails_on_cli(tmp_path, [*IMAGE, "strategy=freeze_unfreeze", "strategy.head_epochs=9", "trainer.max_epochs=3",
                            "compress_stages=false"],
                 "stage 'unfreeze' (set by strategy.head_epochs=9) starts at epoch 9 but trainer.max_epochs=3, "
                 "so it would never run. Raise trainer.max_epochs above 9")


# -- the config, in-process: key, expectation and given value in the message -------------------

@pytest.mark.parametrize("overrides,pattern", [
    # wrong types (trainer.max_epochs=abc: on the CLI above)
    (["data.batch_size=big"], r"^data\.batch_size must be an integer >= 1, got 'big'\.$"),
    (["data.batch_size=2.5"], r"^data\.batch_size must be an integer >= 1, got 2\.5\.$"),
    (["trainer.max_epochs=1.5"], r"^trainer\.max_epochs must be an integer >= 1, got 1\.5\.$"),
    (["trainer.max_epochs=null"], r"^trainer\.max_epochs must be an integer >= 1, got null\.$"),
    (["data.image_size=abc"], r"^data\.image_size must be an integer in \[8, 4096\] or null, got 'abc'\.$"),
    (["strategy.head_epochs=abc"], r"^strategy\.head_epochs must be an integer >= 1, got 'abc'\.$"),
    (["module.layer_decay=abc"], r"^module\.layer_decay must be a number in \(0, 1\], got 'abc'\.$"),
    (["module.stage_rewarmup=null"], r"^module\.stage_rewarmup must be an integer >= 0, got null\.$"),
    (["data.max_train_samples=abc"], r"^data\.max_train_samples must be an integer >= 1 or null, got 'abc'\.$"),
    (["data.samples_per_class=0"], r"^data\.samples_per_class must be an integer >= 1 or null, got 0\.$"),
    (["data.min_epoch_samples=abc"], r"^data\.min_epoch_samples must be an integer >= 1 or null, got 'abc'\.$"),
    (["perf.compile=yes"], r"^perf\.compile must be true or false, got 'yes'\.$"),
    # zero training batches: the run used to end FINISHED, with nothing trained
    (["trainer.limit_train_batches=0"], (r"^trainer\.limit_train_batches must be null, a number of batches "
                                         r"\(an integer >= 1\) or a fraction in \(0, 1\], got 0\.$")),
    # misspelt keys added with + (without +, Hydra refuses them: tests/cli/test_train.py)
    (["+optimizer.lrr=1e-3"], (r"^optimizer\.lrr is not a setting of torch\.optim\.AdamW \(it takes .*\blr\b.*\); "
                               r"remove it or fix its spelling\.$")),
    (["+strategy.head_epoch=2"], (r"^strategy\.head_epoch is not a setting of tunelab\.engine\.strategies\.freeze_unfreeze "
                                  r"\(it takes .*head_epochs")),
    (["+module.layer_decy=0.5"], r"^module\.layer_decy is not a module setting \(settings: .*layer_decay"),
    # learning rates <= 0 (optimizer.lr=0: tests/cli/test_train.py)
    (["optimizer.lr=-1e-3"], r"^optimizer\.lr must be > 0, got -0\.001\.$"),
    (["optimizer.lr=abc"], r"^optimizer\.lr must be a number > 0, got 'abc'\.$"),
    (["optimizer.lr=inf"], r"^optimizer\.lr must be a finite number > 0, got inf\.$"),
    (["strategy.lr_mult=-0.1"], r"^strategy\.lr_mult must be a number > 0 \(a multiplier of optimizer\.lr\), got -0\.1\.$"),
    (["module.group_lr_mults={head: 0}"], (r"^module\.group_lr_mults must be a mapping of names to numbers > 0 .*"
                                           r"got \{'head': 0\}\.$")),
    (["strategy=milestones", "trainer.max_epochs=5", "strategy.stages=[{at_epoch: 1, lr_mult: -1}]"],
     r"^strategy\.stages\[0\]\.lr_mult must be a number > 0 .*got -1\.$"),
    # num_classes mismatch: mnist5k has 10
    (["data.num_classes=7"], (r"^data\.num_classes=7 but .*mnist_5k\.csv\.gz has labels up to 9 \(10 classes: .*\)\. "
                              r"Set data\.num_classes=10, or null")),
    # schedules that overlap or run past trainer.max_epochs
    (["strategy=milestones", "trainer.max_epochs=5", "strategy.stages=[{at_epoch: 2, unfreeze: 2}, {at_epoch: 1}]"],
     r"^strategy\.stages\[1\]\.at_epoch=1 must be later than strategy\.stages\[0\]\.at_epoch=2: list the stages"),
    (["strategy=milestones", "trainer.max_epochs=5", "strategy.stages=[{at_epoch: 1}, {at_epoch: 1}]"],
     r"^strategy\.stages\[1\]\.at_epoch=1 must be later than strategy\.stages\[0\]\.at_epoch=1"),
    (["strategy=milestones", "trainer.max_epochs=3", "compress_stages=false"],  # the shipped stages open at epochs 1, 2, 3
     r"^stage 'stage3' \(set by strategy\.stages\[2\]\.at_epoch=3\) starts at epoch 3 but trainer\.max_epochs=3"),
    (["strategy=milestones", "trainer.max_epochs=5", "strategy.stages=[{at_epoch: 0}, {at_step: 10}]"],
     r"^strategy\.stages\[1\]\.at_step: every stage must use the same unit, but strategy\.stages\[0\] uses at_epoch"),
    (["strategy=milestones", "strategy.stages=[{at_epoch: abc}]"],
     r"^strategy\.stages\[0\]\.at_epoch must be an integer >= 0, got 'abc'\.$"),
    (["strategy=lp_ft", "strategy.probe_epochs=4", "trainer.max_epochs=4", "compress_stages=false"],
     r"^stage 'finetune' \(set by strategy\.probe_epochs=4\) starts at epoch 4 but trainer\.max_epochs=4"),
    # a scheduler setting its own code used to reject with a ValueError
    (["scheduler=plateau", "scheduler.factor=2"], r"^scheduler\.factor must be in \(0, 1\), got 2\.$"),
    # an interpolation that cannot resolve, a required group removed
    (["data.batch_size=${nope}"], r"^data\.batch_size: cannot resolve its value: Interpolation key 'nope' not found\.$"),
    (["~optimizer"], r"^optimizer must be a config choice \(adamw, sgd\), got null; pick one with optimizer=<choice>\.$"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, monkeypatch, overrides, pattern):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fails_in_process(tmp_path, [*IMAGE, *overrides], pattern)


# Regressions: each of these crashed with a raw exception (as found by tests/config/test_config_fuzz.py)
@pytest.mark.parametrize("overrides,pattern", [
    (["trainer.max_epochs=abc"], r"trainer\.max_epochs must be an integer"),  # ValueError: int('abc')
    (["trainer.max_epochs=[1,2]"], r"trainer\.max_epochs must be an integer"),  # TypeError
    (["strategy.head_epochs=1.5"], r"strategy\.head_epochs must be an integer"),  # TypeError in range()
    (["strategy.lr_mult=null"], r"strategy\.lr_mult must be"),  # TypeError: None > 0
    (["+strategy.bogus=1"], r"strategy\.bogus is not a setting"),  # TypeError when the partial is called
    (["+module.bogus=1"], r"module\.bogus is not a module setting"),  # TypeError: FineTuneModule(bogus=)
    (["module.group_lr_mults=abc"], r"module\.group_lr_mults must be a mapping"),  # ValueError: dict('abc')
    (["module.group_lr_mults={head: abc}"], r"module\.group_lr_mults must be"),  # ValueError: float('abc')
    (["data.num_classes=abc"], r"data\.num_classes must be an integer >= 2 or null"),  # TypeError in scan
    (["strategy=milestones", "strategy.stages=abc"], r"strategy\.stages must be a list"),  # ValueError: dict('a')
    (["strategy=milestones", "strategy.stages=[{at_epoch: 0, unfreeze: 1.5}]"],
     r"strategy\.stages\[0\]\.unfreeze must be 'all', a count"),  # TypeError: float is not iterable
    (["strategy=milestones", "strategy.stages=[{at_epoch: 0, unfreeze: '('}]"],
     r"strategy\.stages\[0\]\.unfreeze: '\(' is not a valid regex"),  # re.error
    (["strategy=regex", "strategy.patterns=[1]"], r"strategy\.patterns must be a non-empty list of strings"),
    (["data.batch_size=null"], r"data\.batch_size must be an integer >= 1, got null"),  # 3-line "cannot build data"
    (["scheduler=plateau", "scheduler.mode=up"], r"scheduler\.mode must be min or max, got 'up'"),  # ValueError
    (["module.stage_rewarmup=val/acc"], r"module\.stage_rewarmup must be an integer >= 0"),  # ValueError: int()
    (["data.seed=[{at_epoch: 0}]"], r"data\.seed must be an integer in \[0, 4294967295\]"),  # numpy TypeError
    (["~strategy"], r"strategy must be a config choice \(bitfit, .*\), got null"),  # ConfigAttributeError
    (["strategy=lora", "+lora.rr=8"], r"lora\.rr is not a LoRA setting \(settings: target_modules, r, alpha"),
    (["strategy=lora", "lora.r=abc"], r"lora\.r must be an integer >= 1, got 'abc'"),  # "not all arguments converted"
])
def test_values_that_used_to_crash(tmp_path, monkeypatch, overrides, pattern):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fails_in_process(tmp_path, [*IMAGE, *overrides], pattern)


def test_removed_data_group_is_named(tmp_path):
    """~data used to end in omegaconf's ConfigAttributeError ("Missing key scan")."""
    fails_in_process(tmp_path, [*TINY, "~data"],  # debug=smoke still sets data.batch_size & co.
                     r"^data must be a config choice \(audio_csv, .*\), got only batch_size, eval_batch_size, "
                     r"num_workers \(no _target_\); pick one with data=<choice>\.$")


def test_bad_seed_is_named(tmp_path):
    """numpy's ValueError before (split seeds); on the CLI train.py seeds before this check runs: see
    test_cli_bad_seed_is_one_line below."""
    from tunelab.engine.build import build_parts

    with pytest.raises(TunelabError, match=r"^seed must be an integer in \[0, 4294967295\], got -1\.$"):
        build_parts(compose_cfg(tmp_path, [*IMAGE, "seed=-1"]))


def test_build_errors_are_one_line(tmp_path):
    """Whatever a target raises on its arguments comes out as one line naming what was built."""
    cfg = compose_cfg(tmp_path, [*IMAGE, "+trainer.limit_predict_batches=-3"])
    with pytest.raises(TunelabError, match=r"^cannot build trainer \(lightning\.pytorch\.Trainer\): \w+") as caught:
        build(cfg.trainer, "trainer", logger=False)
    assert "\n" not in str(caught.value)


# -- the data ---------------------------------------------------------------------------------

def corrupt(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).bytes(300))  # random bytes named .png
    return path


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:60])  # a real PNG cut short: the header reads, the data does not
    return path


def test_cli_corrupt_image_is_named_before_training(tmp_path):
    """Scanning opens every image, so the run stops before training (no MLflow run), even with a
    DataLoader worker that would otherwise have hit the file mid-epoch."""
    root = write_image_folder(tmp_path / "images")
    bad = corrupt(root / "class_1" / "x.png")
    line = fails_on_cli(tmp_path, [*IMAGE, "data=image_folder", f"data.source.root={root}", "data.num_workers=1"],
                        f"1 of 19 image files under {root} cannot be read as images: {bad} (cannot identify image "
                        "file). Remove or replace them.")
    assert line.count(str(bad)) == 1


@pytest.mark.parametrize("make,pattern", [
    # an empty folder (no class folders at all: tests/data/test_data.py), class folders without images
    (lambda root: [(root / c).mkdir(parents=True) for c in "ab"] and (root / "a" / "notes.txt").write_text("x"),
     r"^data\.source\.root=.*: Found no valid file for the classes a, b\..*\(expected: one sub-folder per class"),
    # a corrupt image among good ones
    (lambda root: corrupt(write_image_folder(root) / "class_0" / "x.png"),
     r"^1 of 19 image files under .*/images cannot be read as images: .*/class_0/x\.png \(cannot identify image file\)"),
    # a truncated one (a real PNG cut short: the header reads, the data does not)
    (lambda root: truncate(write_image_folder(root) / "class_2" / "3.png"),
     r"^1 of 18 image files under .*/images cannot be read as images: .*/class_2/3\.png \("),
])
def test_image_folder_problems_are_named(tmp_path, make, pattern):
    make(tmp_path / "images")
    fails_in_process(tmp_path, [*IMAGE, "data=image_folder", f"data.source.root={tmp_path / 'images'}"], pattern)


def _image_csv(tmp_path: Path, extra_rows: list[str] = (), labels=None) -> Path:
    root = write_image_folder(tmp_path / "images")
    table = path_table(root, "*.png")
    lines = table.read_text().splitlines()
    if labels is not None:
        lines = ["path,label"] + [f"{line.split(',')[0]},{labels(i)}" for i, line in enumerate(lines[1:])]
    table.write_text("\n".join([*lines, *extra_rows]) + "\n")
    return table


@pytest.mark.parametrize("extra,pattern", [
    (["class_0/0.png,class_0,surplus"],  # one field too many: pandas names the line
     (r"^data\.source\.path: cannot parse .*labels\.csv as csv: Error tokenizing data\. C error: Expected 2 fields "
      r"in line 20, saw 3$")),
    (["class_0/gone.png,class_0"],
     (r"^data\.source\.path: 1 of 19 files listed in .*labels\.csv \(column 'path'\) do not exist: "
      r".*/class_0/gone\.png\. Fix those rows, or data\.source\.root")),
])
def test_image_csv_rows_are_named(tmp_path, extra, pattern):
    table = _image_csv(tmp_path, extra)
    fails_in_process(tmp_path, [*IMAGE, "data=image_csv", f"data.source.path={table}"], pattern)


def test_image_csv_corrupt_image_and_label_out_of_range(tmp_path):
    table = _image_csv(tmp_path, labels=lambda i: 12 if i == 5 else i % 10)
    fails_in_process(tmp_path, [*IMAGE, "data=image_csv", f"data.source.path={table}", "data.num_classes=10"],
                     r"^data\.num_classes=10 but .*labels\.csv has labels up to 12, first at '.*/class_0/5\.png' "
                     r"\(13 classes: .*\)\. Set data\.num_classes=13, or null")
    corrupt(tmp_path / "images" / "class_2" / "0.png")
    fails_in_process(tmp_path / "again", [*IMAGE, "data=image_csv", f"data.source.path={table}"],
                     r"^1 of 18 image files listed in .*labels\.csv cannot be read as images: .*/class_2/0\.png")


def _text_rows(tmp_path: Path, extra: list[str]) -> Path:
    csv = write_text_csv(tmp_path / "texts.csv")
    csv.write_text(csv.read_text() + "".join(f"{row}\n" for row in extra))
    return csv


@pytest.mark.parametrize("extra,overrides,pattern", [
    (["a review,pos,1.0,other,surplus"], [],
     r"^data\.source\.path: cannot parse .*texts\.csv as csv: .*Expected 4 fields in line 38, saw 5$"),
    ([f"review {i},{i % 10},0.0,x" for i in range(40)] + ["an outlier,12,0.0,x"], ["data.num_classes=10"],
     r"^data\.num_classes=10 but .*texts\.csv has labels up to 12, first at 'an outlier'"),
])
def test_text_table_rows_are_named(tmp_path, extra, overrides, pattern):
    if overrides:  # integer labels only: the generated reviews use names
        csv = tmp_path / "texts.csv"
        csv.write_text("text,label,score,other\n" + "".join(f"{row}\n" for row in extra))
    else:
        csv = _text_rows(tmp_path, extra)
    fails_in_process(tmp_path, [*TINY, "data=text_table", f"data.source.path={csv}", *overrides], pattern)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_short_csv_row_is_skipped_with_a_logged_count(tmp_path):
    """A row with a missing cell (too few fields, an empty label) is dropped, and said so."""
    csv = _text_rows(tmp_path, ["just a text without a label", "another one,,0.0,x"])
    records = _Records()
    logging.getLogger("tunelab.data.table").addHandler(records)
    try:
        dm = build(compose_cfg(tmp_path, ["data=text_table", f"data.source.path={csv}"]).data, "data").scan()
    finally:
        logging.getLogger("tunelab.data.table").removeHandler(records)
    assert len(dm.table) == 36
    assert records.messages == [f"{csv}: skipped 2 of 38 rows with an empty 'text' or 'label' (line 38, line 39)"]


def test_unreadable_image_at_load_is_one_line_even_from_a_worker(tmp_path):
    """With the scan's check off (or above VERIFY_LIMIT images), the first load names the file: torch
    re-raises a worker's exception with the worker's traceback inside the message; ItemError
    cuts it back to the original line."""
    from torch.utils.data import DataLoader

    from tunelab.data.images import ImageDataModule
    from tunelab.data.sources import load_image_folder

    root = write_image_folder(tmp_path / "images", classes=2, per_class=4)
    bad = corrupt(root / "class_0" / "0.png")
    dm = ImageDataModule(lambda: load_image_folder(str(root), verify=False), image_size=32, num_workers=0,
                         val_fraction=0.25, test_fraction=0.25).scan()
    table = dm.splits["train"][0]
    dataset = dm.dataset("train")
    dataset.indices = np.array([table.items.index(str(bad))])
    with pytest.raises(TunelabError) as caught:
        next(iter(DataLoader(dataset, batch_size=1, num_workers=1)))
    assert str(caught.value) == f"cannot read image {bad}: cannot identify image file; remove or replace the file."


# -- checked by train() and the command line's preflight, before Hydra or any data -

def test_cli_bad_seed_is_one_line(tmp_path):
    fails_on_cli(tmp_path, [*IMAGE, "seed=abc"], "seed must be an integer in [0, 4294967295], got 'abc'.")


def test_cli_group_set_to_null_is_one_line(tmp_path):
    result = run_train(tmp_path, "debug=smoke", *IMAGE, "optimizer=null")
    assert result.returncode in (1, 2) and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_a_train_fraction_that_rounds_to_no_batch_is_refused_before_the_run(tmp_path):
    fails_on_cli(tmp_path, [*IMAGE, "trainer.limit_train_batches=1e-3"],
                 "trainer.limit_train_batches=0.001 of 8 training batches is none")
