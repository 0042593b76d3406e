"""Data-parallel runs: who starts the ranks, which rank logs, and what happens when one dies.

Lightning's own DDP launcher re-runs ``sys.argv`` for every extra rank, which under a Hydra
multirun starts a new sweep per rank (lightning#18175). tunelab starts ranks 1..N-1 itself,
each from the job's *resolved* config file (``python -m tunelab.cli.rank_worker CONFIG``), and the
job's own process becomes rank 0; Lightning then sees ``LOCAL_RANK`` set and launches nothing.
Ranks started by torchrun or SLURM's srun are joined as they are.

Only global rank 0 creates the MLflow run. Rank 0 watches its sibling processes: if one dies,
the run is marked FAILED and the job exits at once, instead of waiting in a collective for a
peer that will never answer.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from tunelab.errors import TunelabError
from tunelab.ports import free_port

log = logging.getLogger("tunelab")
RANK_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def ddp_strategy(timeout_s: float = 300, find_unused_parameters: bool = False, **kwargs):
    """Lightning's DDPStrategy with a collective timeout given in seconds (YAML has no timedelta)."""
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(timeout=timedelta(seconds=float(timeout_s)), find_unused_parameters=find_unused_parameters,
                       **kwargs)


def is_ddp(cfg: DictConfig) -> bool:
    strategy = cfg.trainer.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    return "ddp" in str(target).lower()


def local_world_size(cfg: DictConfig) -> int:
    """Processes per node: trainer.devices as a count or a list of device ids."""
    if not is_ddp(cfg):
        return 1
    devices = cfg.trainer.get("devices", 1)
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    if str(devices) in ("auto", "-1"):
        raise TunelabError("trainer.devices must be a number or a list of device ids under DDP, "
                           f"got {devices!r}; e.g. trainer.devices=2.")
    return int(devices)


def externally_launched() -> bool:
    """torchrun, srun or a tunelab rank worker already made this process one rank of many."""
    if "LOCAL_RANK" in os.environ:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ


def global_rank() -> int:
    """This process's rank. Ranks tunelab started carry srun's SLURM_PROCID=0 too when their job
    has one Slurm task, so tunelab's own variables are read first."""
    if "TUNELAB_LOCAL_WORLD" in os.environ and "LOCAL_RANK" in os.environ:
        return int(os.environ.get("NODE_RANK", "0")) * int(os.environ["TUNELAB_LOCAL_WORLD"]) + int(os.environ["LOCAL_RANK"])
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    if "LOCAL_RANK" in os.environ:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return int(os.environ.get("NODE_RANK", "0")) * per_node + int(os.environ["LOCAL_RANK"])
    return 0


class RankGroup:
    """Ranks 1..N-1 of one job on this machine, started from the resolved config file."""

    def __init__(self, cfg: DictConfig, world: int, folder: Path):
        self.world = world
        self.folder = folder
        self.processes: list[subprocess.Popen] = []
        self.on_failure: Callable[[str], None] | None = None
        self._stop = threading.Event()
        folder.mkdir(parents=True, exist_ok=True)
        # Every rank reads this file: one resolution, so every rank trains the same config. It may
        # hold values read from the environment (the run's records get them redacted), so it is
        # the ranks' own file: owner-only, and gone when they are.
        self.config_path = folder / ".ranks_config.yaml"
        self.config_path.touch(mode=0o600)
        self.config_path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        self.env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NODE_RANK": "0",
                    "WORLD_SIZE": str(world), "TUNELAB_LOCAL_WORLD": str(world)}

    def start(self) -> None:
        threads = max(1, (os.cpu_count() or 1) // self.world)
        for rank in range(1, self.world):
            env = {**os.environ, **self.env, "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": str(threads)}
            out = open(self.folder / f"rank{rank}.log", "w")
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "tunelab.cli.rank_worker", str(self.config_path)],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        threading.Thread(target=self._watch, name="tunelab-rank-watch", daemon=True).start()
        log.info("ddp: started ranks 1..%d (logs %s/rank<N>.log), this process is rank 0",
                 self.world - 1, self.folder)

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            for rank, proc in enumerate(self.processes, 1):
                code = proc.poll()
                if code not in (None, 0):
                    self._fail(f"rank {rank} exited with code {code}; its log: {self.folder}/rank{rank}.log")
                    return

    def _fail(self, reason: str) -> None:
        """A sibling died: rank 0 would wait for it forever inside a collective, so end the job now."""
        print(f"tunelab-train: error: {reason}", file=sys.stderr, flush=True)
        try:
            if self.on_failure:
                self.on_failure(reason)
        finally:
            self.stop()
            os._exit(1)

    def dead(self, wait: float = 5.0) -> str | None:
        """Which sibling died, if one did: waits briefly, since its socket closes before it exits."""
        deadline = time.monotonic() + wait
        while True:
            for rank, proc in enumerate(self.processes, 1):
                code = proc.poll()
                if code not in (None, 0):
                    return f"rank {rank} exited with code {code}; its log: {self.folder}/rank{rank}.log"
            if time.monotonic() > deadline:
                return None
            time.sleep(0.2)

    @contextmanager
    def blame(self) -> Iterator[None]:
        """Rank 0 failing in a collective because a sibling died reports the sibling, not gloo."""
        try:
            yield
        except Exception as err:
            reason = self.dead()
            if reason is None:
                raise
            self._stop.set()  # the watchdog would say the same thing again
            raise TunelabError(f"{reason} (rank 0 then failed with {type(err).__name__})") from None

    def join(self, timeout: float = 120) -> None:
        """After rank 0 is done: every rank must finish cleanly too."""
        deadline = time.monotonic() + timeout
        for rank, proc in enumerate(self.processes, 1):
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise TunelabError(f"rank {rank} did not finish {timeout:.0f} s after rank 0; "
                                   f"see {self.folder}/rank{rank}.log") from None
            if code != 0:
                raise TunelabError(f"rank {rank} exited with code {code}; see {self.folder}/rank{rank}.log")
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.processes:
            proc.wait()
        self.config_path.unlink(missing_ok=True)


@contextmanager
def rank_processes(cfg: DictConfig, folder: Path) -> Iterator[RankGroup | None]:
    """Start this job's other ranks when it is a DDP job nobody else launched; rank 0 is us.

    The rank variables are set in this process only for the job's duration, so the next job
    of an in-process sweep starts its own ranks again.
    """
    world = local_world_size(cfg)
    if world <= 1:
        yield None
        return
    if externally_launched():  # torchrun / srun started the ranks; each leaves its group cleanly
        try:
            yield None
        finally:
            leave_process_group()
        return
    if int(cfg.trainer.get("num_nodes", 1)) > 1:
        raise TunelabError("trainer.num_nodes > 1 needs a cluster launcher that starts one process per GPU "
                           "(hydra/launcher=slurm, or torchrun on each node); see docs/cluster.md.")
    group = RankGroup(cfg, world, folder)
    saved = {k: os.environ.get(k) for k in (*RANK_ENV, "TUNELAB_LOCAL_WORLD")}
    os.environ.update({**group.env, "LOCAL_RANK": "0"})
    try:
        group.start()
        yield group
    finally:
        group.stop()
        leave_process_group()  # the next job of an in-process sweep starts a new group
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def cluster_plugins() -> dict:
    """The cluster environment Lightning must use, as Trainer keyword arguments.

    Inside a Slurm job Lightning picks its SLURM environment by itself, which reads each
    process's rank from srun's variables and traps SIGUSR1 to ``scontrol requeue`` the job.
    Ranks tunelab (or torchrun) started inside a job of one Slurm task all carry srun's rank 0,
    so they are told to read their launcher's variables instead. Ranks srun started keep
    SLURM's view, without the requeue: pre-emption is tunelab's (SIGTERM saves a resumable
    checkpoint, resume=auto continues the same run), and a requeued job would start a second run.
    """
    from lightning.pytorch.plugins.environments import (LightningEnvironment, SLURMEnvironment,
                                                        TorchElasticEnvironment)

    if "TUNELAB_LOCAL_WORLD" in os.environ:
        return {"plugins": [LightningEnvironment()]}
    if TorchElasticEnvironment.detect():
        return {"plugins": [TorchElasticEnvironment()]}
    if "SLURM_NTASKS" in os.environ and SLURMEnvironment.detect():
        return {"plugins": [SLURMEnvironment(auto_requeue=False)]}
    return {}


def leave_process_group() -> None:
    """Shut the process group down before the interpreter does (else gloo aborts the process
    with 'terminate called without an active exception')."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rewrap_ddp(trainer) -> bool:
    """Re-wrap the model in a new DistributedDataParallel after the trainable set changed.

    DDP registers the parameters that require grad when it is built; a parameter unfrozen
    later would get no gradient all-reduce and the ranks would drift apart (lightning#20340).
    Building a new wrapper (all ranks do it at the same step) registers the new set and
    broadcasts rank 0's weights once. Costs one broadcast per stage change.
    """
    from lightning.pytorch.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy) or not isinstance(strategy.model, DistributedDataParallel):
        return False
    strategy.model = strategy._setup_model(strategy.model.module)
    strategy._register_ddp_hooks()
    return True



class RankAgreement(L.Callback):
    """Every rank hashes the config it trains; the hashes are compared before the first step."""

    def __init__(self, digest: str):
        self.digest = digest
        self.hashes: list[str] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.world_size <= 1:
            return
        mine = torch.tensor([int(self.digest, 16)], dtype=torch.int64, device=pl_module.device)
        self.hashes = [f"{int(v):012x}" for v in trainer.strategy.all_gather(mine).flatten().tolist()]
        if len(set(self.hashes)) > 1:
            raise TunelabError(f"the DDP ranks resolved different configs (hashes {self.hashes}); "
                               "every rank must read the config rank 0 resolved.")
