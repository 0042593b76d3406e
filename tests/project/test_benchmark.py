"""scripts/benchmark.py runs end to end (tiny sizes) and writes the JSON the docs quote."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO


def _benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_writes_ratios_speedups_memory_and_the_cached_probe(tmp_path, capsys):
    bench = _benchmark()
    assert bench.main(["--model", "test_efficientnet", "--batch-size", "4", "--image-size", "32", "--steps", "2",
                       "--warmup", "1", "--repeats", "1", "--out", str(tmp_path), "--cached-probe", "--probe-epochs", "2",
                       "--probe-overrides", "model=resnet18", "model.arch=test_efficientnet", "data.image_size=32",
                       "data.max_train_samples=40", "data.val_fraction=0.02", "data.test_fraction=0.02"]) == 0
    result = json.loads((tmp_path / "test_efficientnet-cpu-eager-32-true-probe.json").read_text())
    rows = {r["strategy"]: r for r in result["rows"]}
    assert list(rows) == ["full", "half", "head"]
    assert rows["full"]["trainable_params"] == rows["full"]["total_params"]
    assert rows["head"]["trainable_params"] < rows["half"]["trainable_params"] < rows["full"]["trainable_params"]
    for row in rows.values():
        assert row["raw_samples_per_s"] > 0 and row["tunelab_samples_per_s"] > 0
        # the JSON rounds samples/s, which at a few samples/s (a busy machine) moves the quotient,
        # and the ratio to 3 decimals
        assert row["ratio"] == pytest.approx(row["tunelab_samples_per_s"] / row["raw_samples_per_s"], rel=0.01, abs=5e-4)
    assert set(result["freeze_speedups"]) == {"half", "head"}
    probe = result["cached_probe"]
    assert probe["head_max_abs_diff"] < 1e-4  # the cached head is the uncached head
    assert probe["cached_s"] > 0 and probe["uncached_s"] > 0
    out = capsys.readouterr().out
    assert "overhead (full fine-tuning): tunelab/raw =" in out and "cached probe:" in out
