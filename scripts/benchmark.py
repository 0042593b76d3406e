#!/usr/bin/env python
"""Training throughput of tunelab against a raw PyTorch loop, in one process, on one synthetic batch.

    .venv/bin/python scripts/benchmark.py                                  # EfficientNet-Lite0, CPU
    .venv/bin/python scripts/benchmark.py --model resnet50 --batch-size 128 --image-size 224 --precision bf16-mixed --channels-last
    .venv/bin/python scripts/benchmark.py --model bert-base --seq-len 128 --compile
    .venv/bin/python scripts/benchmark.py --cached-probe                   # 10-epoch linear probe, cached vs not
    .venv/bin/python scripts/benchmark.py --strategies none --activation-checkpointing   # step memory and speed, off vs on

For each strategy (full fine-tuning, lower half frozen, head only) it times the same batch
through (a) a plain loop: forward, cross-entropy, backward, AdamW step, and (b) tunelab's own
path: the composed Hydra config, ``build_parts`` (FineTuneModule with its layer-group param
groups and LR schedule) and a Lightning Trainer with the stage callback. It prints samples/s,
the ratio tunelab/raw, the freezing speedups and peak memory, and writes the same as JSON into
``benchmarks/results/``. Both loops share the model architecture, the frozen set, BatchNorm
handling (``module.batchnorm=eval``, tunelab's default for pretrained weights), precision, layout and compilation: the
ratio is the framework's overhead, nothing else. Random weights are fine for speed.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # name -> Hydra overrides building it (random weights unless shipped)
    "efficientnet_lite0": ["model=efficientnet_lite0"],
    "vit_tiny": ["model=vit_tiny"],  # conf/model/vit_tiny.yaml: ViT-Tiny/16, random init
    "minilm": ["model=minilm"],
    # BERT-base sizes, random init; its tokenizer is a synthetic 30,522-word vocabulary (see
    # bert_tokenizer): the batches are random token ids, and no checkpoint needs to ship
    "bert-base": ["model=hf_text", "model.path=null", "model.pretrained=false", "model.config={model_type: bert}"],
    "bert-tiny": ["model=hf_text", "model.path=null", "model.pretrained=false",  # the same path in seconds (dry runs)
                  "model.config={model_type: bert, hidden_size: 128, num_hidden_layers: 2, num_attention_heads: 2, "
                  "intermediate_size: 512}"],
}
BERT_VOCAB = 30522
TARGETS = {"overhead_cpu": 0.95, "overhead_gpu": 0.97, "freeze_speedup_fraction": 0.90, "cached_probe": 10.0}
# Dense bf16 tensor-core peak (FLOP/s, no sparsity) by device name, from the vendors' data
# sheets; the first entry whose key is in torch.cuda.get_device_name() counts. MFU is reported
# only for a device listed here.
BF16_PEAK = {"H200": 989.4e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989.4e12, "GH200": 989.4e12,
             "A100": 312e12, "L40S": 362.05e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12}


def model_overrides(name: str) -> list[str]:
    if name.startswith("bert-"):
        return [*MODELS[name], f"model.tokenizer={bert_tokenizer()}"]
    # any other name is a timm architecture, built from random init by the generic timm config
    return MODELS.get(name, ["model=resnet18", f"model.arch={name}", "model.pretrained=false"])


def _scratch_dir(prefix: str) -> str:
    """A temporary folder, removed when the benchmark exits."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def bert_tokenizer() -> str:
    """A folder holding a WordPiece tokenizer over BERT's vocabulary size (special tokens, then
    placeholder words): what the text adapter needs to build BERT-base without any download."""
    from transformers import BertTokenizerFast

    folder = Path(_scratch_dir("tunelab-bench-tokenizer-"))
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (folder / "vocab.txt").write_text("\n".join([*special, *(f"w{i}" for i in range(BERT_VOCAB - len(special)))]) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return str(folder)


# -- the synthetic data both loops read --------------------------------------------------------
class _Repeat(Dataset):
    def __init__(self, batch, steps: int):
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i):
        return self.batch


class SyntheticData(L.LightningDataModule):
    """What ``build_parts`` asks of a datamodule, serving one fixed batch ``steps`` times."""

    name, task, threshold = "synthetic", "classification", 0.5  # threshold: multilabel only, unused here

    def __init__(self, modality: str, num_classes: int, image_size: int, steps: int):
        super().__init__()
        self.modality, self.num_classes, self.num_outputs = modality, num_classes, num_classes
        self.image_size, self.steps, self.batch = image_size, steps, None

    @property
    def model_kwargs(self) -> dict:
        return {"image_size": self.image_size} if self.modality == "image" else {}

    def scan(self):
        return self

    def target_stats(self):
        return None

    def class_counts(self):
        return None  # no class weights for the loss

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.steps * len(self.batch[1]) if self.batch else self.steps, "val": 0, "test": 0}

    def random_training_inputs(self):
        return None

    def set_model_data_config(self, data_config: dict) -> None:
        self.model_data_config = data_config

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Repeat(self.batch, self.steps), batch_size=None)


def train_only(model, trainable: set[str], device) -> None:
    """``model`` on ``device`` in training mode, with gradients for the ``trainable`` names alone."""
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    model.to(device).train()


def bf16_peak(device_name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK.items() if key in device_name), None)


def step_flops(model, batch, trainable: set[str], args, device) -> int:
    """FLOPs of one training step as executed (forward + backward of the trainable part),
    counted by torch's FlopCounterMode on the raw model: frozen layers' weight gradients and
    the input gradients below the lowest trainable layer are not computed, so not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    train_only(model, trainable, device)
    x, y = batch
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed"):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def make_batch(modality: str, batch_size: int, image_size: int, seq_len: int, vocab: int, classes: int, device):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (batch_size,), generator=g).to(device)
    if modality == "image":
        return torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device), y
    ids = torch.randint(1000, vocab, (batch_size, seq_len), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, y


# -- measuring ---------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of a phase: CUDA allocator peak, or the process RSS sampled every 5 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return self
        import ctypes
        import gc

        import psutil

        gc.collect()
        try:  # hand memory freed by earlier phases back to the OS, so the delta is this phase's
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        process = psutil.Process()
        self.base = process.memory_info().rss

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, process.memory_info().rss - self.base)
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
        self.mb = round(self.peak / 2**20, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepTimer(L.Callback):
    """Wall time of the steps after ``warmup`` (compilation and allocator warm-up excluded).

    The device is synchronised only where the clock starts and at the last step, as the raw
    loop does: a wait at every step would stop the host from queuing work ahead of the GPU."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device, self.start, self.end, self.steps = warmup, device, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            sync(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == trainer.num_training_batches - 1:
            sync(self.device)
            self.end, self.steps = time.perf_counter(), batch_idx + 1 - self.warmup


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    from tunelab.config import conf_dir

    scratch = _scratch_dir("tunelab-bench-")  # nothing is written there: no logger, no checkpoints
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        # module.batchnorm=eval: the raw loop mirrors it, and random-weight models would get
        # batch statistics under the default (auto), which the raw loop does not model
        cfg = hydra_compose("train", overrides=[f"paths.output_dir={scratch}", "module.batchnorm=eval", *overrides])
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def raw_loop(model, batch, trainable: set[str], args, device, steps: int) -> tuple[float, float]:
    """The baseline: what a practitioner writes by hand, with the same frozen set and settings."""
    train_only(model, trainable, device)
    for m in model.modules():  # module.batchnorm=eval (set in compose()), mirrored
        if isinstance(m, _BatchNorm):
            m.eval()
    x, y = batch
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=args.fused)
    step_model = torch.compile(model, backend=args.compile_backend) if args.compile else model  # compiled after the freeze
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    with PeakMemory(device) as memory:
        for i in range(steps):
            if i == args.warmup:
                sync(device)
                start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with autocast:  # batches come from a loader in NCHW: converted at every step, as tunelab does
                inputs = x.contiguous(memory_format=torch.channels_last) if args.channels_last else x
                loss = F.cross_entropy(step_model(inputs), y)
            loss.backward()
            optimizer.step()
        sync(device)
    return args.batch_size * (steps - args.warmup) / (time.perf_counter() - start), memory.mb


def tunelab_loop(cfg, data: SyntheticData, args, device, timer: StepTimer | None = None,
                 extra: tuple = ()) -> tuple[float, float, object]:
    from tunelab.engine.recipe import core_callbacks
    from tunelab.config import build
    from tunelab.engine.build import build_parts

    parts = build_parts(cfg, datamodule=data)
    timer = timer or StepTimer(args.warmup, device)
    trainer = build(cfg.trainer, "trainer", logger=False, enable_checkpointing=False,
                    callbacks=[*core_callbacks(parts), timer, *extra])
    with PeakMemory(device) as memory:
        trainer.fit(parts.module, datamodule=data)
    return args.batch_size * timer.steps / (timer.end - timer.start), memory.mb, parts


def strategy_overrides(strategy: str, backbone_groups: int) -> list[str]:
    if strategy == "full":
        return ["strategy=full"]
    if strategy == "head":
        return ["strategy=linear_probe", "perf.cache_features=false"]  # the step itself, not the cache
    return ["strategy=milestones", f"strategy.stages=[{{at_epoch: 0, unfreeze: {backbone_groups // 2}}}]"]


def common_overrides(args, device) -> list[str]:
    """What every measured tunelab run shares: the model, one epoch of training only, the settings."""
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    return [*model_overrides(args.model), "retention.enabled=false", "trainer.max_epochs=1",
            f"trainer.accelerator={accelerator}", f"trainer.precision={args.precision}", "++trainer.limit_val_batches=0",
            "++trainer.enable_progress_bar=false", "callbacks=none", f"perf.compile={args.compile}",
            f"perf.compile_backend={args.compile_backend}",
            f"perf.channels_last={args.channels_last}", f"data.image_size={args.image_size}",
            f"perf.fused_optimizer={args.fused}"]


def run_strategies(args, device) -> dict:
    from tunelab.config import build

    common = common_overrides(args, device)
    steps = args.warmup + args.steps
    strategies = args.strategies.split(",")
    if strategies[0] != "full":
        raise SystemExit("--strategies must start with full: it sizes the half-frozen stage and the speedups")
    rows, backbone_groups = [], 0
    for strategy in strategies:
        cfg = compose([*common, *strategy_overrides(strategy, backbone_groups)])
        data = synthetic_data(cfg, args, device, steps)
        raw_runs, tl_runs, flops = [], [], 0
        for _ in range(args.repeats):  # alternating, best of N: the least disturbed run of each loop
            torch.manual_seed(0)
            raw_model = build(cfg.model, "model", num_outputs=args.classes, **data.model_kwargs).model
            torch.manual_seed(0)
            tl_sps, tl_mb, parts = tunelab_loop(cfg, data, args, device)
            tl_runs.append((tl_sps, tl_mb))
            backbone_groups = backbone_groups or len(parts.adapter.groups) - 1
            trainable = {n for n, p in parts.module.model.named_parameters() if p.requires_grad}
            total = sum(p.numel() for p in parts.module.model.parameters())
            n_trainable = sum(p.numel() for p in parts.module.model.parameters() if p.requires_grad)
            del parts
            flops = flops or step_flops(raw_model, data.batch, trainable, args, device) / args.batch_size
            raw_runs.append(raw_loop(raw_model, data.batch, trainable, args, device, steps))
            del raw_model
        raw_sps, raw_mb = max(r[0] for r in raw_runs), min(r[1] for r in raw_runs)
        tl_sps, tl_mb = max(r[0] for r in tl_runs), min(r[1] for r in tl_runs)
        rows.append({"strategy": strategy, "trainable_params": n_trainable, "total_params": total,
                     "raw_samples_per_s": round(raw_sps, 2), "tunelab_samples_per_s": round(tl_sps, 2),
                     "ratio": round(tl_sps / raw_sps, 3), "raw_peak_mb": raw_mb, "tunelab_peak_mb": tl_mb,
                     "flops_per_sample": round(flops), **mfu(flops, raw_sps, tl_sps, device)})
        shown_mfu = f"  MFU raw {rows[-1]['raw_mfu']:.3f} tunelab {rows[-1]['tunelab_mfu']:.3f}" if "raw_mfu" in rows[-1] else ""
        print(f"  {strategy:<5} raw {raw_sps:9.1f}/s  tunelab {tl_sps:9.1f}/s  ratio {tl_sps / raw_sps:.3f}  "
              f"trainable {n_trainable:,}/{total:,}  peak MB raw {raw_mb} tunelab {tl_mb}{shown_mfu}", flush=True)
    full, speedups = rows[0], {}
    for r in rows[1:]:
        raw_up = r["raw_samples_per_s"] / full["raw_samples_per_s"]
        tl_up = r["tunelab_samples_per_s"] / full["tunelab_samples_per_s"]
        speedups[r["strategy"]] = {"raw": round(raw_up, 3), "tunelab": round(tl_up, 3),
                                   "fraction_of_raw": round(tl_up / raw_up, 3)}
    return {"rows": rows, "freeze_speedups": speedups}


def synthetic_data(cfg, args, device, steps: int) -> SyntheticData:
    modality = "text" if cfg.model._target_.endswith("text_adapter") else "image"
    data = SyntheticData(modality, args.classes, args.image_size, steps)
    data.batch = make_batch(modality, args.batch_size, args.image_size, args.seq_len, BERT_VOCAB, args.classes, device)
    return data


def mfu(flops_per_sample: float, raw_sps: float, tl_sps: float, device) -> dict:
    """Model FLOPs utilisation of each loop: FLOPs per sample x samples/s / the bf16 peak."""
    peak = bf16_peak(torch.cuda.get_device_name()) if device.type == "cuda" else None
    if not peak:
        return {}
    return {"raw_mfu": round(flops_per_sample * raw_sps / peak, 4), "tunelab_mfu": round(flops_per_sample * tl_sps / peak, 4)}


def cached_probe(args, device) -> dict:
    """A 10-epoch linear probe on the default data (augmentation off), cached vs not: fit time
    and the largest difference between the two trained heads."""
    from tunelab.engine.recipe import core_callbacks
    from tunelab.config import build
    from tunelab.engine.build import build_parts

    result = {}
    for setting in ("true", "false"):
        cfg = compose(["strategy=linear_probe", "data.augment=null", f"trainer.max_epochs={args.probe_epochs}",
                       "retention.enabled=false", "callbacks=none", "++trainer.enable_progress_bar=false",
                       f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}", f"perf.cache_features={setting}",
                       f"trainer.precision={args.precision}",  # the precision its result file is named by
                       *args.probe_overrides])
        torch.manual_seed(0)
        parts = build_parts(cfg)
        trainer = build(cfg.trainer, "trainer", logger=False, enable_checkpointing=False, callbacks=core_callbacks(parts))
        started = time.perf_counter()
        trainer.fit(parts.module, datamodule=parts.datamodule)
        seconds = time.perf_counter() - started
        head = {n: p.detach().cpu().clone() for n, p in parts.module.model.named_parameters() if p.requires_grad}
        result[setting] = (seconds, head, float(trainer.callback_metrics["val/acc"]))
        print(f"  cache_features={setting}: {seconds:.1f} s for {args.probe_epochs} epochs, val/acc "
              f"{result[setting][2]:.4f}", flush=True)
    (cached_s, cached_head, cached_acc), (plain_s, plain_head, plain_acc) = result["true"], result["false"]
    diff = max((cached_head[n] - plain_head[n]).abs().max().item() for n in cached_head)
    return {"epochs": args.probe_epochs, "cached_s": round(cached_s, 2), "uncached_s": round(plain_s, 2),
            "speedup": round(plain_s / cached_s, 2), "head_max_abs_diff": diff,
            "val_acc": {"cached": cached_acc, "uncached": plain_acc}}


def allocation_peak(profiler) -> int:
    """The peak of the running sum of the CPU allocations (+) and frees (-) a profiler recorded."""
    from torch._C._profiler import _ExtraFields_Allocation

    events, stack = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        fields = node.extra_fields
        if isinstance(fields, _ExtraFields_Allocation) and fields.device.type == "cpu":
            events.append((node.start_time_ns, fields.alloc_size))
    running = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        running += size
        peak = max(peak, running)
    return peak


class StepMemory(L.Callback):
    """Peak memory of training step ``at`` (forward, backward, optimizer step): what the step
    holds at once above what was live when it began; its activations are most of it.

    CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` at the step's start.
    CPU: torch's profiler (``profile_memory=True``) records every allocation and free of torch's
    CPU allocator during the step (RSS and tracemalloc miss or blur them); the peak of their
    running sum. A tensor made before the step and freed in it (the last step's gradients, which
    ``zero_grad`` drops) is not seen freed on CPU, so the CPU figure counts the gradients in full.
    """

    def __init__(self, at: int, device: torch.device):
        self.at, self.device, self.profiler, self.base, self.mb = at, device, None, 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx != self.at:
            return
        if self.device.type == "cuda":
            sync(self.device)
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        from torch.profiler import ProfilerActivity, profile

        self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx != self.at:
            return
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.profiler.__exit__(None, None, None)
            peak = allocation_peak(self.profiler)
        self.mb = round(peak / 2**20, 1)


def activation_checkpointing(args, device) -> dict:
    """Full fine-tuning through tunelab's path with ``perf.activation_checkpointing`` off and on:
    samples/s (best of ``--repeats``, alternating), then, after every timed run (profiling never
    overlaps timing), the peak memory of step 1 of one more short fit each (StepMemory; step 0
    creates the optimizer state)."""
    cfgs = {setting: compose([*common_overrides(args, device), "strategy=full",
                              f"++perf.activation_checkpointing={setting}"]) for setting in (False, True)}
    speed = {setting: [] for setting in cfgs}
    for _ in range(args.repeats):
        for setting, cfg in cfgs.items():
            torch.manual_seed(0)
            speed[setting].append(tunelab_loop(cfg, synthetic_data(cfg, args, device, args.warmup + args.steps), args,
                                               device)[0])
    rows = []
    for setting, cfg in cfgs.items():
        memory = StepMemory(1, device)
        torch.manual_seed(0)
        tunelab_loop(cfg, synthetic_data(cfg, args, device, 2), args, device, StepTimer(0, device), (memory,))
        rows.append({"activation_checkpointing": setting, "samples_per_s": round(max(speed[setting]), 2),
                     "step_peak_mb": memory.mb})
        print(f"  activation_checkpointing={str(setting).lower():<5} {rows[-1]['samples_per_s']:9.1f}/s  "
              f"step peak {memory.mb:8.1f} MB", flush=True)
    off, on = rows
    return {"rows": rows, "memory_ratio": round(on["step_peak_mb"] / off["step_peak_mb"], 3),
            "speed_ratio": round(on["samples_per_s"] / off["samples_per_s"], 3),
            "memory": "CUDA allocator peak above the step's start" if device.type == "cuda" else
                      "torch profiler: peak of the CPU allocations live at once during the step"}


def summarize(folder: Path) -> str:
    """The Markdown table docs/performance.md quotes, from every JSON in ``folder``."""
    lines = ["| model | device | mode | precision | layout | strategy | trainable | raw /s | tunelab /s | tunelab/raw "
             "| speedup raw | speedup tunelab | of raw's | peak MB raw / tunelab | MFU raw / tunelab |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    probes, checkpointing = [], []
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        if "cached_probe" in r:
            probes.append((path.name, r["cached_probe"]))
        if "activation_checkpointing" in r:
            checkpointing.append(r)
        if "cached_probe" in r and len(r["rows"]) == 1:
            continue  # a probe-only file: its one row is a smoke measurement
        for row in r["rows"]:
            up = r["freeze_speedups"].get(row["strategy"])
            cells = [r["model"], r["device"].split(",")[0] if "cpu" in r["device"] else r["device"], r["mode"],
                     r["precision"], "channels_last" if r["channels_last"] else "NCHW", row["strategy"],
                     f"{row['trainable_params']:,}", f"{row['raw_samples_per_s']:.1f}", f"{row['tunelab_samples_per_s']:.1f}",
                     f"**{row['ratio']:.3f}**", f"{up['raw']:.2f}x" if up else "1", f"{up['tunelab']:.2f}x" if up else "1",
                     f"**{up['fraction_of_raw']:.2f}**" if up else "-", f"{row['raw_peak_mb']:.0f} / {row['tunelab_peak_mb']:.0f}",
                     f"{row['raw_mfu']:.1%} / {row['tunelab_mfu']:.1%}" if "raw_mfu" in row else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    for name, c in probes:
        lines.append(f"\ncached probe ({name}): {c['epochs']} epochs, cached {c['cached_s']} s vs uncached {c['uncached_s']} s "
                     f"= **{c['speedup']}x**; head weights differ by {c['head_max_abs_diff']:.1e}; val/acc "
                     f"{c['val_acc']['cached']:.4f} vs {c['val_acc']['uncached']:.4f}")
    if len(lines) == 2 and not probes:  # only checkpointing files: no empty strategy table
        lines = []
    if checkpointing:
        lines += ["", "| model | device | precision | batch | input | samples/s off / on | step peak MB off / on | memory on/off "
                  "| speed on/off |", "|---|---|---|---|---|---|---|---|---|"]
    for r in checkpointing:
        c = r["activation_checkpointing"]
        off, on = c["rows"]
        size = f"{r['image_size']} px" if "minilm" not in r["model"] and "bert" not in r["model"] else f"{r['seq_len']} tokens"
        lines.append(f"| {r['model']} | {r['device'].split(',')[0] if 'cpu' in r['device'] else r['device']} | {r['precision']} "
                     f"| {r['batch_size']} | {size} | {off['samples_per_s']:.1f} / {on['samples_per_s']:.1f} "
                     f"| {off['step_peak_mb']:.1f} / {on['step_peak_mb']:.1f} | **{c['memory_ratio']:.2f}** | {c['speed_ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0",
                        help="efficientnet_lite0, minilm, bert-base, bert-tiny, or any timm architecture (random init)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per text (text models)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default=None, help="32-true or bf16-mixed (default: bf16-mixed on GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both loops (tunelab recompiles per stage)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no code generation)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-fused", dest="fused", action="store_false", help="AdamW's foreach step instead of the fused one")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per loop and strategy; the best counts")
    parser.add_argument("--strategies", default="full,half,head",
                        help="comma list from full, half, head, full first; none: only the cached probe")
    parser.add_argument("--cached-probe", action="store_true", help="also time a linear probe with and without the feature cache")
    parser.add_argument("--probe-epochs", type=int, default=10)
    parser.add_argument("--probe-overrides", nargs="*", default=[], help="Hydra overrides for the probe's run")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="also time full fine-tuning with perf.activation_checkpointing off and on, with one step's peak memory")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--summarize", type=Path, metavar="FOLDER", help="print the Markdown table of FOLDER's JSON files and exit")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    args.precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*no `val_dataloader`.*")
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores"
    mode = "compiled" if args.compile else "eager"
    peak = bf16_peak(machine) if device.type == "cuda" else None
    print(f"{args.model} on {machine}: batch {args.batch_size}, {mode}, {args.precision}"
          f"{', channels_last' if args.channels_last else ''}; {args.steps} timed steps after {args.warmup}", flush=True)
    if device.type == "cuda":
        print(f"dense bf16 peak for MFU: {f'{peak / 1e12:.1f} TFLOP/s' if peak else 'unknown for this device (no MFU)'}")
    result = {"model": args.model, "device": machine, "bf16_peak_flops": peak, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "batch_size": args.batch_size, "image_size": args.image_size, "seq_len": args.seq_len, "mode": mode,
              "precision": args.precision, "channels_last": args.channels_last, "fused_adamw": args.fused, "steps": args.steps,
              "warmup": args.warmup, "repeats": args.repeats, "targets": TARGETS,
              **(run_strategies(args, device) if args.strategies != "none" else {"rows": [], "freeze_speedups": {}})}
    if args.cached_probe:
        result["cached_probe"] = cached_probe(args, device)
    if args.activation_checkpointing:
        result["activation_checkpointing"] = activation_checkpointing(args, device)
    overhead_target = TARGETS["overhead_gpu" if device.type == "cuda" else "overhead_cpu"]
    for full in result["rows"][:1]:
        print(f"overhead (full fine-tuning): tunelab/raw = {full['ratio']:.3f} (target >= {overhead_target}: "
              f"{'met' if full['ratio'] >= overhead_target else 'MISSED'})")
    for name, up in result["freeze_speedups"].items():
        ok = up["fraction_of_raw"] >= TARGETS["freeze_speedup_fraction"]
        print(f"freeze speedup {name}: raw {up['raw']:.2f}x, tunelab {up['tunelab']:.2f}x = "
              f"{up['fraction_of_raw']:.2f} of raw's (target >= 0.90: {'met' if ok else 'MISSED'})")
    if "cached_probe" in result:
        c = result["cached_probe"]
        print(f"cached probe: {c['speedup']:.1f}x faster (target >= 10: {'met' if c['speedup'] >= 10 else 'MISSED'}), "
              f"heads differ by {c['head_max_abs_diff']:.1e}")
    if "activation_checkpointing" in result:
        c = result["activation_checkpointing"]
        print(f"activation checkpointing: step peak memory x{c['memory_ratio']:.2f}, samples/s x{c['speed_ratio']:.2f} "
              f"({c['memory']})")
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.model}-{device.type}-{mode}-{args.precision}{'-cl' if args.channels_last else ''}"
    tag += "-probe" if args.cached_probe else ""
    tag += "-ckpt" if args.activation_checkpointing else ""
    path = args.out / f"{tag}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
