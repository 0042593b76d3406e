#!/usr/bin/env python
"""Everything tunelab claims about GPUs, measured in one run of at most 8 minutes.

    bash scripts/gpu_check.sh OUT_DIR                        # on a GPU node (installs wheelhouse/ first)
    python scripts/gpu_check.py OUT_DIR --device cpu --tiny  # the dry run CI makes: tiny sizes, CPU

Parts, each a subprocess with its own time budget (a part that fails or runs out of time is
reported and the others still run):
  1. scripts/benchmark.py at GPU sizes (bf16-mixed, channels_last, fused AdamW): resnet50 224 px
     batch 128 full/half/head eager, vit_base_patch16_224 batch 64 full/head, a BERT-base encoder
     seq 128 batch 32 full/head, and resnet50 compiled last: ratios tunelab/raw, freeze speedups,
     peak memory, MFU against the device's dense bf16 peak;
  2. the README's main job with trainer=gpu, logged to a SQLite store in the work folder: test
     accuracy, wall time, training samples/s beside the data loader's own samples/s, and a
     cProfile of 60 of its training steps (where the host's time goes);
  3. the cached-feature linear probe, cached vs uncached;
  4. a DDP smoke through NCCL (trainer=ddp trainer.devices=1) and a 2-trial joblib sweep.
Writes OUT_DIR/gpu_check.json, OUT_DIR/gpu_check.md (the tables docs/performance.md shows),
the benchmark JSON files in OUT_DIR/results/ and every part's log in OUT_DIR/logs.tar.gz.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 480  # the hard limit: 8 minutes on one H100-class GPU
GPU_TRAINER, CPU_TRAINER = ["trainer=gpu"], ["trainer=cpu"]


class Part(NamedTuple):
    name: str
    budget_s: int
    command: list[str]
    env: dict = {}  # variables set for this part's process (never mutated)


def bench(name: str, budget: int, model: list[str], args, compiled: bool = False) -> Part:
    """A scripts/benchmark.py run; compiled runs repeat twice (each repeat compiles again)."""
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), *model, "--device", args.device,
           "--out", str(args.out / "results"), "--repeats", "1" if args.tiny else "2" if compiled else "3"]
    if args.device == "cuda":
        cmd += ["--precision", "bf16-mixed"]
    if args.tiny:
        cmd += ["--steps", "2", "--warmup", "1"]
    if compiled:  # the dry run compiles with aot_eager: no C++ code generation on CI
        cmd += ["--compile", *(["--compile-backend", "aot_eager"] if args.tiny else [])]
    return Part(name, budget, cmd)


def parts(args) -> list[Part]:
    tiny = args.tiny
    # --tiny: the same parts on smaller members of each family, so the CI dry run takes minutes
    resnet = ["--model", "resnet18" if tiny else "resnet50", "--image-size", "32" if tiny else "224",
              "--batch-size", "2" if tiny else "128", "--channels-last"]
    vit = ["--model", "vit_tiny_patch16_224" if tiny else "vit_base_patch16_224", "--image-size", "224",
           "--batch-size", "2" if tiny else "64", "--channels-last", "--strategies", "full,head"]
    bert = ["--model", "bert-tiny" if tiny else "bert-base", "--seq-len", "16" if tiny else "128", "--batch-size", "2" if tiny else "32",
            "--strategies", "full,head"]
    trainer = CPU_TRAINER if args.device == "cpu" else GPU_TRAINER
    main_job = [*trainer, *(["debug=smoke"] if tiny else [])]
    train = [sys.executable, "-m", "tunelab.cli.train"]
    probe = ["--strategies", "none", "--cached-probe", "--probe-epochs", "2" if tiny else "10"]
    if tiny:
        probe += ["--probe-overrides", "data.max_train_samples=40", "data.val_fraction=0.02", "data.test_fraction=0.02",
                  "data.image_size=32"]
    ddp = ["trainer=ddp_cpu" if args.device == "cpu" else "trainer=ddp", "trainer.devices=1", "debug=smoke"]
    sweep = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optimizer.lr=1e-3,3e-4", "debug=smoke", *trainer]
    return [
        bench("bench_resnet50", 100, resnet, args),
        bench("bench_vit", 70, vit, args),
        bench("bench_bert", 70, bert, args),
        Part("main_job", 150, [*train, *main_job], {"TUNELAB_HOME": str(args.work / "main_job")}),
        Part("loader_rate", 40, [sys.executable, __file__, "--loader-rate", *main_job]),
        Part("step_profile", 50, [sys.executable, __file__, "--step-profile", *main_job]),
        Part("cached_probe", 80, [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--device", args.device,
                                  "--out", str(args.out / "results"), *probe]),
        Part("ddp_smoke", 80, [*train, *ddp], {"TUNELAB_HOME": str(args.work / "ddp_smoke")}),
        Part("sweep", 100, [*train, *sweep], {"TUNELAB_HOME": str(args.work / "sweep")}),
        bench("bench_resnet50_compiled", 200, resnet, args, compiled=True),
    ]


# -- running ---------------------------------------------------------------------------------
def run_part(part: Part, seconds: float, logs: Path) -> dict:
    """Run one part in its own process group; kill the group when its time is up."""
    log_path = logs / f"{part.name}.log"
    env = {**os.environ, **part.env, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    print(f"[gpu_check] {part.name}: up to {seconds:.0f} s: {' '.join(part.command[1:])}", flush=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(part.command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                   start_new_session=True)
        try:
            rc = process.wait(timeout=max(1.0, seconds))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            rc = None
    wall = round(time.perf_counter() - started, 1)
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    status = "ok" if rc == 0 else ("timed out" if rc is None else f"failed (exit {rc})")
    print(f"[gpu_check] {part.name}: {status} in {wall} s", flush=True)
    if rc != 0:
        print("    " + "\n    ".join(tail[-6:]), flush=True)
    return {"status": status, "wall_s": wall, **({} if rc == 0 else {"log_tail": tail})}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for gpu_check.json, gpu_check.md, results/ and logs")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU dry run CI makes)")
    parser.add_argument("--work", type=Path, help="scratch folder for the runs' stores and outputs (default OUT/work)")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds for all parts together")
    parser.add_argument("--only", help="comma list of part names to run (default: all)")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.work = (args.work or args.out / "work").resolve()
    known = parts(args)
    unknown = set(args.only.split(",")) - {p.name for p in known} if args.only else set()
    if unknown:
        parser.error(f"--only: no part named {', '.join(sorted(unknown))}; the parts: {', '.join(p.name for p in known)}")
    chosen = [p for p in known if not args.only or p.name in args.only.split(",")]
    from gpu_check_report import environment, read_results, write_report  # noqa: E402 (beside this file)

    report = {"environment": environment(args.device), "budget_s": args.budget, "tiny": args.tiny, "parts": {}}
    if args.device == "cuda" and not report["environment"].get("gpu"):
        raise SystemExit("gpu_check: no CUDA GPU visible (use --device cpu --tiny for the dry run)")
    logs = args.work / "logs"
    for folder in (args.out / "results", logs):
        folder.mkdir(parents=True, exist_ok=True)
    print(f"[gpu_check] {report['environment']}", flush=True)
    deadline = time.perf_counter() + args.budget
    for part in chosen:
        left = deadline - time.perf_counter()
        if left < 5:
            report["parts"][part.name] = {"status": "skipped (total budget spent)"}
            continue
        report["parts"][part.name] = run_part(part, min(part.budget_s, left), logs)
        read_results(part.name, report, args)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")  # after each part
    write_report(report, args)
    with tarfile.open(args.out / "logs.tar.gz", "w:gz") as archive:
        archive.add(logs, arcname="logs")
    failed = [name for name, p in report["parts"].items() if p["status"] != "ok"]
    print(f"[gpu_check] wrote {args.out / 'gpu_check.json'} and gpu_check.md; "
          f"{len(chosen) - len(failed)}/{len(chosen)} parts ok{': not ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if sys.argv[1:2] in (["--loader-rate"], ["--step-profile"]):  # parts measured in their own process
        import gpu_check_report

        measure = gpu_check_report.loader_rate if sys.argv[1] == "--loader-rate" else gpu_check_report.step_profile
        print(json.dumps(measure(sys.argv[2:])))
        sys.exit(0)
    sys.exit(main())
