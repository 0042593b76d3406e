"""What scripts/gpu_check.py reads back after each part, and the report it writes."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from importlib import metadata
from pathlib import Path

from benchmark import TARGETS, bf16_peak, compose, summarize

PACKAGES = ("torch", "lightning", "timm", "transformers", "torchmetrics", "hydra-core", "omegaconf", "mlflow-skinny",
            "mlflow", "optuna", "hydra-joblib-launcher")


def environment(device: str) -> dict:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    env = {"python": platform.python_version(), "cpus": os.cpu_count(), "packages": versions}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                "bf16_peak_tflops": (bf16_peak(props.name) or 0) / 1e12 or None}
    return env


# -- reading a part's results back ----------------------------------------------------------------
def _runs(store: Path) -> tuple[list, object]:
    """Every run in a part's SQLite store, and a client on it; LookupError when there is none
    (read_results reports it as the part's result)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store}") if store.is_file() else None
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=100) if client else []
    if not runs:
        raise LookupError(f"no MLflow run in {store}")
    return runs, client


def read_main_job(report: dict, args) -> dict:
    runs, client = _runs(args.work / "main_job" / "outputs" / "mlflow.db")
    run = runs[0]
    rates = [round(m.value, 1) for m in sorted(client.get_metric_history(run.info.run_id, "perf/train_samples_per_s"),
                                               key=lambda m: m.step)]
    metrics = run.data.metrics
    return {"run_status": run.info.status, "test_acc": metrics.get("test/acc"), "val_acc": metrics.get("val/acc"),
            "run_minutes": round((run.info.end_time - run.info.start_time) / 60000, 2) if run.info.end_time else None,
            "train_samples_per_s_by_epoch": rates}


def read_ddp(report: dict, args) -> dict:
    runs, _ = _runs(args.work / "ddp_smoke" / "outputs" / "mlflow.db")
    run = runs[0]
    return {"run_status": run.info.status, "strategy": run.data.params.get("trainer.strategy._target_"),
            "test_acc": run.data.metrics.get("test/acc")}


def read_sweep(report: dict, args) -> dict:
    home = args.work / "sweep"
    runs, _ = _runs(home / "outputs" / "mlflow.db")
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    placed = sorted({m for log in home.rglob("*.log") for m in re.findall(r"runs on GPU \d+|uses \d+ CPU threads",
                                                                         log.read_text(errors="replace"))})
    return {"parent_status": [r.info.status for r in parents], "child_status": sorted(r.info.status for r in children),
            "placement": placed}


def read_last_line(name: str, args) -> dict:
    """The JSON line a part measured in its own process printed last."""
    lines = (args.work / "logs" / f"{name}.log").read_text(errors="replace").strip().splitlines()
    return json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"error": "no result line"}


READERS = {"main_job": read_main_job, "ddp_smoke": read_ddp, "sweep": read_sweep,
           "loader_rate": lambda report, args: read_last_line("loader_rate", args),
           "step_profile": lambda report, args: read_last_line("step_profile", args)}


def read_results(name: str, report: dict, args) -> None:
    if name in READERS:
        try:
            report["parts"][name]["result"] = READERS[name](report, args)
        except Exception as error:  # a broken part must not stop the report
            report["parts"][name]["result"] = {"error": f"{type(error).__name__}: {error}"}


def loader_rate(overrides: list[str]) -> dict:
    """One training epoch through the run's own data loader (same workers, pinned memory on CUDA),
    no model: the rate loading alone can feed. Timed from the first batch (workers started)."""
    from tunelab.engine.build import build_parts

    cfg = compose(["retention.enabled=false", *overrides])
    datamodule = build_parts(cfg).datamodule
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    samples, started = 0, None
    for index, (_, y) in enumerate(loader):
        if index == 0:
            started = time.perf_counter()
            continue
        samples += len(y)
    seconds = time.perf_counter() - started
    return {"loader_samples_per_s": round(samples / seconds, 1), "num_workers": loader.num_workers,
            "pin_memory": loader.pin_memory, "batch_size": loader.batch_size}


def step_profile(overrides: list[str], steps: int = 60, warmup: int = 20) -> dict:
    """Where the host's time goes in tunelab's training steps: ``steps`` steps of the run's own
    config (loaders, callbacks, validation off) under cProfile, after ``warmup`` steps left out
    (loader workers starting, cuDNN choosing its kernels); the functions with the most time of
    their own. Time spent waiting for the GPU shows up in the call that waits."""
    import cProfile
    import pstats

    from lightning.pytorch import Callback

    from tunelab.engine.recipe import core_callbacks
    from tunelab.config import build
    from tunelab.engine.build import build_parts

    profile, clock = cProfile.Profile(), {}

    class ProfileAfterWarmup(Callback):
        def on_train_batch_start(self, trainer, *_):
            if trainer.global_step == warmup:
                clock["started"] = time.perf_counter()
                profile.enable()

        def on_train_end(self, trainer, *_):
            profile.disable()
            if "started" not in clock:
                raise SystemExit(f"step_profile: the run ended after {trainer.global_step} steps, before the {warmup} warm-up steps")
            clock["seconds"] = time.perf_counter() - clock["started"]

    total = steps + warmup
    cfg = compose(["retention.enabled=false", f"++trainer.max_steps={total}", f"++trainer.limit_train_batches={total}",
                   "++trainer.limit_val_batches=0", "++trainer.enable_progress_bar=false", *overrides])
    parts = build_parts(cfg)
    callbacks = [*core_callbacks(parts), ProfileAfterWarmup()]
    trainer = build(cfg.trainer, "trainer", logger=False, enable_checkpointing=False, callbacks=callbacks)
    trainer.fit(parts.module, datamodule=parts.datamodule)
    steps = trainer.global_step - warmup  # the steps that ran under the profiler
    stats = pstats.Stats(profile)
    stats.sort_stats("tottime").print_stats(25)
    top = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:12]  # (file, line, name) -> (..., tottime, ...)
    return {"steps": steps, "warmup_steps": warmup, "fit_s": round(clock["seconds"], 2),
            "ms_per_step": round(1000 * clock["seconds"] / steps, 1),
            "top_self_ms_per_step": {f"{Path(f).name}:{line}({name})": round(1000 * st[2] / steps, 2)
                                     for (f, line, name), st in top}}


# -- the report ---------------------------------------------------------------------------------
def _benchmarks(folder: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def _verdict(ok: bool | None) -> str:
    return "pending" if ok is None else ("met" if ok else "**missed**")


def targets(results: dict, device: str) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows, from the benchmark files."""
    rows, overhead = [], TARGETS["overhead_gpu" if device == "cuda" else "overhead_cpu"]
    for tag, r in results.items():
        if not r["rows"]:
            continue
        full = r["rows"][0]
        rows.append((f"tunelab/raw >= {overhead}, full fine-tuning ({tag})", f"{full['ratio']:.3f}",
                     _verdict(full["ratio"] >= overhead)))
        for strategy, up in r["freeze_speedups"].items():
            rows.append((f"freeze speedup >= 90 % of raw's, {strategy} ({tag})", f"{up['fraction_of_raw']:.2f}",
                         _verdict(up["fraction_of_raw"] >= TARGETS["freeze_speedup_fraction"])))
        if r["model"].startswith("vit_base") and "raw_mfu" in full:
            rows.append((f"ViT-B/16 full fine-tuning MFU, raw / tunelab ({tag})",
                         f"{full['raw_mfu']:.1%} / {full['tunelab_mfu']:.1%}", "reported"))
    for tag, r in results.items():
        if "cached_probe" in r:
            c = r["cached_probe"]
            rows.append((f"cached linear probe >= 10x uncached ({tag})", f"{c['speedup']:.1f}x "
                         f"({c['cached_s']} s vs {c['uncached_s']} s)", _verdict(c["speedup"] >= TARGETS["cached_probe"])))
    return rows


def run_rows(parts: dict) -> list[str]:
    lines = ["| part | status | wall s | result |", "|---|---|---|---|"]
    for name, part in parts.items():
        result = part.get("result", {})
        shown = ", ".join(f"{k} {v}" for k, v in result.items()) if result else ""
        lines.append(f"| {name} | {part['status']} | {part.get('wall_s', '-')} | {shown} |")
    return lines


def bound_by(parts: dict) -> str | None:
    """Loading or compute: the main job's last-epoch training rate against the loader alone."""
    job = parts.get("main_job", {}).get("result", {})
    loader = parts.get("loader_rate", {}).get("result", {})
    rates, feed = job.get("train_samples_per_s_by_epoch"), loader.get("loader_samples_per_s")
    if not rates or not feed:
        return None
    share = rates[-1] / feed
    verdict = "loading bounds the run" if share > 0.8 else "compute (or the framework) bounds the run"
    return (f"main job, last epoch: {rates[-1]:.0f} training samples/s; the loader alone: {feed:.0f} samples/s "
            f"({loader['num_workers']} workers, pin_memory={loader['pin_memory']}) -> training runs at "
            f"{share:.0%} of the loading rate: {verdict}")


def write_report(report: dict, args) -> None:
    results = _benchmarks(args.out / "results")
    report["targets"] = [{"target": t, "measured": m, "verdict": v} for t, m, v in targets(results, args.device)]
    report["bound_by"] = bound_by(report["parts"])
    env = report["environment"]
    lines = [f"# GPU check{' (dry run: tiny sizes)' if args.tiny else ''}", "",
             f"{env.get('gpu', 'CPU')}, {env['cpus']} CPU cores, Python {env['python']}, "
             + ", ".join(f"{k} {v}" for k, v in env["packages"].items())
             + (f"; dense bf16 peak for MFU: {env['bf16_peak_tflops']} TFLOP/s" if env.get("bf16_peak_tflops") else ""),
             "", summarize(args.out / "results"), "", "| target | measured | |", "|---|---|---|",
             *(f"| {t['target']} | {t['measured']} | {t['verdict']} |" for t in report["targets"]), "",
             *([report["bound_by"], ""] if report["bound_by"] else []), *run_rows(report["parts"]), ""]
    (args.out / "gpu_check.md").write_text("\n".join(lines))
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join(lines), file=sys.stdout, flush=True)
