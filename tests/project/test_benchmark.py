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


def test_benchmark_reports_activation_checkpointing_memory_and_speed(tmp_path, capsys):
    """--activation-checkpointing: samples/s and one step's peak memory (CPU: torch's profiler,
    which counts every tensor torch allocates) with perf.activation_checkpointing off and on."""
    bench = _benchmark()
    # 128 px: 65 tokens, so activations outweigh the gradients of timm's 0.4 M-parameter test ViT
    assert bench.main(["--model", "test_vit", "--batch-size", "4", "--image-size", "128", "--steps", "2", "--warmup", "1",
                       "--repeats", "1", "--strategies", "none", "--activation-checkpointing", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "test_vit-cpu-eager-32-true-ckpt.json").read_text())["activation_checkpointing"]
    off, on = result["rows"]
    assert (off["activation_checkpointing"], on["activation_checkpointing"]) == (False, True)
    assert off["samples_per_s"] > 0 and on["samples_per_s"] > 0
    # the blocks keep their inputs only: the step holds well under the plain step's memory
    assert 0 < on["step_peak_mb"] < 0.6 * off["step_peak_mb"]
    assert result["memory_ratio"] == pytest.approx(on["step_peak_mb"] / off["step_peak_mb"], abs=2e-3)
    assert "profiler" in result["memory"]
    assert "activation checkpointing: step peak memory x" in capsys.readouterr().out
    table = bench.summarize(tmp_path)
    assert "| test_vit | cpu | 32-true | 4 | 128 px |" in table and "step peak MB off / on" in table


def test_step_memory_sees_what_torch_allocates_on_cpu():
    """StepMemory's CPU figure against a closed form: a step that holds a 4 MiB tensor and an
    8 MiB one at once peaks at 12 MiB (tracemalloc would see nothing: torch allocates in C++)."""
    import torch

    bench = _benchmark()
    memory = bench.StepMemory(0, torch.device("cpu"))
    memory.on_train_batch_start(None, None, None, 0)
    a = torch.ones(2**20)  # 4 MiB of float32
    b = torch.ones(2**21)  # 8 MiB
    del a, b
    c = torch.ones(2**20)
    memory.on_train_batch_end(None, None, None, None, 0)
    assert memory.mb == pytest.approx(12.0, abs=0.05) and c.sum() == 2**20
