"""Issue 19, items 11-13: data that disagrees with itself or with the config.

11. Links in a class folder: a loop (``loop -> ..``) made torchvision's walk count every image
    again under every class (16 images became 656, relabelled, leaking across splits); two loops
    never finished. Every folder source (found from conf/data, not listed here) now counts each
    real file once, with the class folder it really lives in; links that leave the root are refused
    in one line naming the link and its target, and the walk is bounded (data.source.max_entries).
    A table with data.source.root lists files under that root only.
12. data.num_classes must equal the classes the data names (folders, label names, or 0..K-1 for
    integer labels), in both directions, for every kind of source: one line, before any run.
13. Per-class metric keys are distinct (punctuation, ``/``, the 60-character cut), say which class
    they are (``_<index>``), and a logged ``class_metric_keys.json`` maps index -> name -> key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import (compose_cfg, path_table, run_cli, skip_without_fashion, write_audio_folder, write_image_folder,
                      write_text_csv)
from omegaconf import OmegaConf
from helpers.runs import IMAGE, TINY_MODEL as TINY, nothing_written

import tunelab
from tunelab.config import build, conf_dir
from tunelab.errors import TunelabError

PER_CLASS = 8  # images and clips per class in the planted trees: 2 classes, 16 of each


def data_configs(*keys: str, without: str | None = None) -> list[str]:
    """The shipped data configs whose source takes all ``keys`` (and not ``without``): every
    folder source and every table source, as conf/data declares them today."""
    names = []
    for file in sorted((conf_dir() / "data").glob("*.yaml")):
        source = set((OmegaConf.load(file).get("source") or {}).keys())  # keys(): `in` skips ??? values
        if set(keys) <= source and without not in source:
            names.append(file.stem)
    return names


FOLDER_CONFIGS = data_configs("root", without="path")  # image_folder, audio_folder, spoken_digits, fashion_mnist
TABLE_CONFIGS = data_configs("path", "root")  # image_csv, audio_csv


def test_discovery_finds_the_folder_and_table_sources():
    assert {"image_folder", "audio_folder", "spoken_digits"} <= set(FOLDER_CONFIGS)
    assert {"image_csv", "audio_csv"} <= set(TABLE_CONFIGS)


def write_tree(root: Path, classes: int = 2) -> Path:
    """``class_<c>/`` folders, each with PER_CLASS images and PER_CLASS clips (each source keeps its own)."""
    write_image_folder(root, classes=classes, per_class=PER_CLASS)
    clips = write_audio_folder(root.parent / f"{root.name}_clips", classes, PER_CLASS, seconds=0.1)
    for c in range(classes):
        for clip in (clips / f"tone_{c}").glob("*.wav"):
            clip.rename(root / f"class_{c}" / clip.name)
    return root


def real_files(root: Path, suffix: str) -> list[tuple[str, int]]:
    """The files of the tree, as they are on disk (no link), with their class folder's index."""
    files = [p for p in root.glob(f"class_*/*{suffix}") if not p.is_symlink()]
    return sorted((str(p), int(p.parent.name.split("_")[1])) for p in files)


def load_source(tmp_path: Path, config: str, overrides: list[str]):
    """The source of ``data=config`` built from the real config tree and called, as the DataModule does."""
    cfg = compose_cfg(tmp_path, [f"data={config}", *overrides])
    return build(cfg.data.source, "data.source")()


def scannable(tmp_path: Path, config: str, tree: Path) -> str:
    """The suffix of the files ``config`` reads from a plain tree; skipped for a source that reads
    fixed files under its root (Fashion-MNIST's *-ubyte.gz), which scans nothing."""
    try:
        table = load_source(tmp_path / "plain", config, [f"data.source.root={tree}"])
    except TunelabError:
        pytest.skip(f"data={config} reads fixed files under its root (it scans no class folders)")
    suffix = Path(table.items[0]).suffix
    assert sorted(zip(table.items, table.labels.tolist())) == real_files(tree, suffix)
    return suffix


# -- 11. links in class folders ------------------------------------------------------------------------

def one_loop(root: Path) -> None:
    (root / "class_0" / "loop").symlink_to("..")


def two_loops(root: Path) -> None:
    (root / "class_0" / "loop").symlink_to("..")
    (root / "class_1" / "deeper").mkdir()
    (root / "class_1" / "deeper" / "up").symlink_to("../..")
    (root / "class_1" / "self").symlink_to(".")


def sibling_file(root: Path) -> None:
    """class_0 borrows class_1's third image and clip: one file, two labels, unless counted once."""
    for suffix in (".png", ".wav"):
        (root / "class_0" / f"borrowed{suffix}").symlink_to(f"../class_1/3{suffix}")


def test_the_planted_loop_is_live_when_links_are_followed(tmp_path):
    """Control: torchvision's walk (what load_image_folder used) multiplies the looped tree's images."""
    from torchvision.datasets.folder import find_classes, make_dataset

    tree = write_tree(tmp_path / "tree")
    one_loop(tree)
    followed = make_dataset(str(tree), find_classes(str(tree))[1], extensions=(".png",))
    assert len(followed) > 10 * 2 * PER_CLASS  # 656 from 16 when this was written


@pytest.mark.parametrize("config", FOLDER_CONFIGS)
@pytest.mark.parametrize("plant", [one_loop, two_loops, sibling_file])
def test_links_inside_the_root_count_each_real_file_once_with_its_own_class(tmp_path, config, plant):
    tree = write_tree(tmp_path / "tree")
    suffix = scannable(tmp_path, config, tree)
    plant(tree)
    table = load_source(tmp_path, config, [f"data.source.root={tree}"])  # finishing at all is the loop test
    assert len(table) == 2 * PER_CLASS
    assert sorted(zip(table.items, table.labels.tolist())) == real_files(tree, suffix)


def outside_folder(root: Path, elsewhere: Path, suffix: str) -> str:
    (root / "class_1" / "more").symlink_to(elsewhere / "class_0")
    return f"{root / 'class_1' / 'more'} is a link to {elsewhere / 'class_0'}, outside the root"


def outside_file(root: Path, elsewhere: Path, suffix: str) -> str:
    (root / "class_0" / f"z{suffix}").symlink_to(elsewhere / "class_1" / f"0{suffix}")
    return f"{root / 'class_0' / f'z{suffix}'} is a link to {elsewhere / 'class_1' / f'0{suffix}'}, outside the root"


def class_folder_out(root: Path, elsewhere: Path, suffix: str) -> str:
    (root / "class_2").symlink_to(elsewhere / "class_0")
    return f"class folder {root / 'class_2'} is a link to {elsewhere / 'class_0'}, outside the root"


def class_folder_twice(root: Path, elsewhere: Path, suffix: str) -> str:
    (root / "class_2").symlink_to(root / "class_0")
    return (f"class folder {root / 'class_2'} is a link to {root / 'class_0'}, inside the root, so its files would "
            "count twice")


@pytest.mark.parametrize("config", FOLDER_CONFIGS)
@pytest.mark.parametrize("plant", [outside_folder, outside_file, class_folder_out, class_folder_twice])
def test_links_that_leave_the_root_or_double_a_class_are_refused_in_one_line(tmp_path, config, plant):
    tree = write_tree(tmp_path / "tree")
    expected = plant(tree, write_tree(tmp_path / "elsewhere"), scannable(tmp_path, config, tree))
    with pytest.raises(TunelabError) as refused:
        load_source(tmp_path, config, [f"data.source.root={tree}"])
    message = str(refused.value)
    assert "\n" not in message and expected in message, message


def test_the_scan_stops_at_its_bound_with_the_override_that_raises_it(tmp_path, monkeypatch):
    tree = write_tree(tmp_path / "tree")
    one_loop(tree)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    with pytest.raises(TunelabError) as stopped:
        tunelab.check([*IMAGE, "data=image_folder", f"data.source.root={tree}", "+data.source.max_entries=20"])
    assert str(stopped.value) == (
        f"data.source.root={tree}: stopped scanning after data.source.max_entries=20 files and folders. Point "
        "data.source.root at the data set's own folder, or raise the bound for a larger data set "
        "(+data.source.max_entries=N).")
    # 2 class folders of 16 files, and the loop: 33 entries, within a bound of 33 (a loop walks no further)
    assert len(load_source(tmp_path, "image_folder", [f"data.source.root={tree}", "+data.source.max_entries=33"])) == 16
    with pytest.raises(TunelabError, match="stopped scanning after data.source.max_entries=32 files"):
        load_source(tmp_path, "image_folder", [f"data.source.root={tree}", "+data.source.max_entries=32"])
    nothing_written(tmp_path)


def test_a_looped_folder_splits_without_duplicates(tmp_path):
    """The run's own view: the splits hold 16 distinct images (they held 656, shared across splits)."""
    tree = write_tree(tmp_path / "tree")
    two_loops(tree)
    sibling_file(tree)
    cfg = compose_cfg(tmp_path, [*IMAGE, "data=image_folder", f"data.source.root={tree}"])
    dm = build(cfg.data, "data").scan()
    assert sum(dm.split_sizes().values()) == 2 * PER_CLASS
    splits = [{dm.splits[s][0].items[i] for i in dm.splits[s][1]} for s in ("train", "val", "test")]
    assert sum(map(len, splits)) == len(set().union(*splits)) == 2 * PER_CLASS


def table_rows_outside(root: Path, elsewhere: Path, suffix: str) -> tuple[list[str], str]:
    """Rows that resolve outside root three ways: ``..``, an absolute path, a link under root."""
    (root / "class_0" / f"link{suffix}").symlink_to(elsewhere / "class_1" / f"1{suffix}")
    rows = [f"../elsewhere/class_0/0{suffix},class_0", f"{elsewhere / 'class_1' / f'2{suffix}'},class_1",
            f"class_0/link{suffix},class_0"]
    return rows, f"3 of {2 * PER_CLASS + 3} files listed in"


@pytest.mark.parametrize("config", TABLE_CONFIGS)
def test_a_table_with_a_root_lists_files_under_that_root_only(tmp_path, config):
    tree = write_tree(tmp_path / "tree")
    suffix = ".wav" if "audio" in config else ".png"
    table = path_table(tree, f"*{suffix}")
    inside = load_source(tmp_path / "inside", config, [f"data.source.path={table}", f"data.source.root={tree}"])
    assert len(inside) == 2 * PER_CLASS
    rows, expected = table_rows_outside(tree, write_tree(tmp_path / "elsewhere"), suffix)
    table.write_text(table.read_text() + "\n".join(rows) + "\n")
    with pytest.raises(TunelabError) as refused:
        load_source(tmp_path, config, [f"data.source.path={table}", f"data.source.root={tree}"])
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"data.source.root={tree}: {expected}"), message
    assert f"are outside it: {tmp_path / 'elsewhere' / 'class_0' / f'0{suffix}'}, " in message  # resolved
    # no root: paths are the table's word, relative ones from its folder (as before)
    assert len(load_source(tmp_path / "no_root", config, [f"data.source.path={table}"])) == 2 * PER_CLASS + 3


def test_a_link_out_of_the_root_fails_the_check_before_any_run(tmp_path, monkeypatch):
    """What tunelab-train --check and the run itself do first (the CLI's one line: test_cli_phantom_...)."""
    tree = write_tree(tmp_path / "tree")
    expected = outside_folder(tree, write_tree(tmp_path / "elsewhere"), ".png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    with pytest.raises(TunelabError) as refused:
        tunelab.check([*IMAGE, "data=image_folder", f"data.source.root={tree}"])
    assert "\n" not in str(refused.value) and expected in str(refused.value)
    nothing_written(tmp_path)


# -- 12. data.num_classes against the classes the data names --------------------------------------------

def image_folder_source(tmp_path: Path) -> list[str]:
    return ["data=image_folder", f"data.source.root={write_image_folder(tmp_path / 'images')}"]


def image_csv_names(tmp_path: Path) -> list[str]:
    return ["data=image_csv", f"data.source.path={path_table(write_image_folder(tmp_path / 'images'), '*.png')}"]


def image_csv_integers(tmp_path: Path) -> list[str]:
    root = write_image_folder(tmp_path / "images")
    table = root / "ints.csv"
    table.write_text("path,label\n" + "".join(f"{p},{p.parent.name[-1]}\n" for p in sorted(root.rglob("*.png"))))
    return ["data=image_csv", f"data.source.path={table}"]


def text_table(tmp_path: Path) -> list[str]:
    return ["data=text_table", f"data.source.path={write_text_csv(tmp_path / 'texts.csv')}"]


def audio_folder(tmp_path: Path) -> list[str]:
    return ["data=audio_folder", f"data.source.root={write_audio_folder(tmp_path / 'audio', seconds=0.1)}"]


def audio_csv(tmp_path: Path) -> list[str]:
    clips = write_audio_folder(tmp_path / "audio", seconds=0.1)
    return ["data=audio_csv", f"data.source.path={path_table(clips, '*.wav')}"]


def mnist5k(tmp_path: Path) -> list[str]:
    return ["data=mnist5k"]


def fashion_mnist(tmp_path: Path) -> list[str]:
    skip_without_fashion()
    return ["data=fashion_mnist"]


def drug_reviews(tmp_path: Path) -> list[str]:
    return ["data=drug_reviews"]


def spoken_digits_source(tmp_path: Path) -> list[str]:
    return ["data=spoken_digits"]  # the root comes from the spoken_digits fixture


SOURCES = {  # source kind -> (overrides, classes it names)
    "image_folder": (image_folder_source, 3), "image_csv names": (image_csv_names, 3),
    "image_csv integers": (image_csv_integers, 3), "text_table": (text_table, 3), "audio_folder": (audio_folder, 3),
    "audio_csv": (audio_csv, 3), "mnist5k": (mnist5k, 10), "fashion_mnist": (fashion_mnist, 10),
    "drug_reviews": (drug_reviews, 3), "spoken_digits": (spoken_digits_source, 10),
}


def test_every_shipped_data_config_is_a_source_kind_below():
    # regression has no classes; multi-label names labels (its own checks: tests/data/test_multilabel.py)
    kinds = {kind.split()[0] for kind in SOURCES} | {"drug_reviews_regression", "mnist5k_attributes"}
    assert {f.stem for f in (conf_dir() / "data").glob("*.yaml")} == kinds


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("direction", [+1, -1])
def test_num_classes_other_than_the_datas_is_one_line_before_any_run(tmp_path, monkeypatch, request, kind, direction):
    make, named = SOURCES[kind]
    overrides = make(tmp_path)
    if kind == "spoken_digits":
        overrides.append(f"data.source.root={request.getfixturevalue('spoken_digits')}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    wrong = named + direction
    with pytest.raises(TunelabError) as refused:
        tunelab.check([*TINY, *overrides, f"data.num_classes={wrong}"])
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"data.num_classes={wrong} but "), message
    assert f"Set data.num_classes={named}, or null to infer it from the data." in message
    if direction > 0:
        assert f"names {named} classes (" in message and "1 output(s) would never see an example" in message
    nothing_written(tmp_path)


def test_an_integer_test_table_may_lack_a_class_the_training_table_has(tmp_path):
    """num_classes counts the classes of the training table (0..K-1): a small held-out table
    without class 2 is fine, and a training table without the top class is a smaller K."""
    rows = [f"review number {i},{i % 3}" for i in range(30)]
    (tmp_path / "train.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    (tmp_path / "test.csv").write_text("text,label\n" + "\n".join(r for r in rows if not r.endswith(",2")) + "\n")
    source = ["data=text_table", f"data.source.path={tmp_path / 'train.csv'}",
              f"data.source.test_path={tmp_path / 'test.csv'}"]
    dm = build(compose_cfg(tmp_path, [*source, "data.num_classes=3"]).data, "data").scan()
    assert dm.num_classes == 3 and dm.classes == ["0", "1", "2"] and 2 not in dm.splits["test"][0].labels
    with pytest.raises(TunelabError, match=r"^data\.num_classes=4 but .*train\.csv names 3 classes \(0, 1, 2\)"):
        build(compose_cfg(tmp_path, [*source, "data.num_classes=4"]).data, "data").scan()


@pytest.mark.slow
def test_cli_phantom_classes_are_one_line_before_any_run(tmp_path):
    root = write_image_folder(tmp_path / "images", classes=2)
    result = run_cli(tmp_path, "debug=smoke", *IMAGE, "data=image_folder", f"data.source.root={root}",
                     "data.num_classes=5")
    errors = [line for line in result.stderr.splitlines() if line.startswith("tunelab-train: error: ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert errors == [f"tunelab-train: error: data.num_classes=5 but {root} names 2 classes (class_0, class_1): "
                      "3 output(s) would never see an example. Set data.num_classes=2, or null to infer it from "
                      "the data."]
    nothing_written(tmp_path)


# -- 13. per-class metric keys ---------------------------------------------------------------------------

def test_class_metric_keys_are_distinct_valid_and_say_which_class():
    from mlflow.utils.validation import _validate_metric_name

    from tunelab.engine.evaluation import class_metric_keys

    long = "a long class name that goes on past sixty characters before it " * 2
    classes = ["a,b", "a;b", long + "ends one way", long + "ends another", "cat", "a_b_1", "", ".", "..",
               "../up", "x/y", "dog", "dog", "Straße", "plain name-1.0"]
    keys = class_metric_keys(classes)
    assert len(set(keys)) == len(classes)
    for i, (name, key) in enumerate(zip(classes, keys)):
        _validate_metric_name(f"test/f1_class/{key}")  # MLflow takes it, as one key (no "/" nesting)
        assert "/" not in key and len(key) <= 60 + 1 + len(str(i))
        assert key == name or key.endswith(f"_{i}"), (name, key)  # unchanged, or names its class index
    assert keys[:2] == ["a_b_0", "a_b_1"] and keys[4] == "cat" and keys[-2:] == ["Straße", "plain name-1.0"]
    assert keys[5] == "a_b_1_5"  # a plain name equal to another class's suffixed key is suffixed too


@pytest.mark.slow
def test_a_real_run_logs_one_distinct_key_per_class_and_the_mapping(tmp_path, monkeypatch):
    """A tiny training on four classes whose names collide when sanitised or cut at 60 characters,
    then ``tunelab-eval runs:/ID`` (where per-class F1 is logged): four keys, four values, and
    class_metric_keys.json naming each key's class."""
    from mlflow.tracking import MlflowClient

    from tunelab.deploy.evaluate import evaluate
    from tunelab.cli.train import train
    from tunelab.tracking.store import tracking_uri

    long = "x" * 60
    names = ["a,b", "a;b", f"{long}-first", f"{long}-second"]
    images = write_image_folder(tmp_path / "images", classes=len(names), per_class=5)
    for c, name in enumerate(names):
        (images / f"class_{c}").rename(images / name)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_cfg(tmp_path, [*IMAGE, "data=image_folder", f"data.source.root={images}",
                                 "data.test_fraction=0.4", "data.val_fraction=0.2"])
    train(cfg)
    client = MlflowClient(tracking_uri(cfg))
    (run,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(cfg))
    evaluate(f"runs:/{run.info.run_id}")

    (evaluation,) = client.search_runs([client.get_experiment_by_name("tunelab-eval").experiment_id])
    logged = sorted(k for k in evaluation.data.metrics if k.startswith("test/f1_class/"))
    mapping = json.loads(Path(client.download_artifacts(evaluation.info.run_id, "class_metric_keys.json",
                                                        str(tmp_path))).read_text())
    classes = sorted(names)  # folder order
    assert [row["class"] for row in mapping] == classes and [row["index"] for row in mapping] == [0, 1, 2, 3]
    assert sorted(row["metric_key"] for row in mapping) == logged and len(logged) == 4
    for row in mapping:
        assert row["metric_key"].endswith(f"_{row['index']}"), row  # every one of these names had to change
        assert np.isfinite(evaluation.data.metrics[row["metric_key"]])
    assert os.path.commonprefix([r["metric_key"] for r in mapping[2:]]) == f"test/f1_class/{long}_"
