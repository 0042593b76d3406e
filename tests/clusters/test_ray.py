"""A sweep on a real Ray cluster: a head on 127.0.0.1 (scripts/clusters/ray_head.py), the launcher
config tunelab ships (conf/hydra/launcher/ray.yaml), the MLflow contract of every other launcher
(one parent, a child per trial), and trials that really ran in the head's workers."""

from __future__ import annotations

import contextlib
import importlib.util
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import psutil
import pytest

from conftest import REPO, run_cli
from helpers.runs import finished_sweep, store_uri


def _load_ray_head():
    spec = importlib.util.spec_from_file_location("ray_head", REPO / "scripts" / "clusters" / "ray_head.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ray_head = _load_ray_head()


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray_head")
    start = time.monotonic()
    with ray_head.ray_head(folder) as address:
        sid = ray_head.head_session(address)
        yield SimpleNamespace(address=address, sid=sid, folder=folder, env=ray_head.client_env(folder),
                              started_in=time.monotonic() - start)
    assert not ray_head.session(sid), "Ray processes outlived the head"


def sweep_processes() -> set[int]:
    """The sweep's own process tree: this test's ``tunelab-train`` and what it started (not the
    other daemons this test session runs, such as its Slurm cluster)."""
    pids = set()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(arg.endswith("tunelab-train") for arg in child.cmdline()[:2]):
                pids |= {child.pid, *(p.pid for p in child.children(recursive=True))}
    return pids


@contextlib.contextmanager
def watching_listeners(sid: int) -> Iterator[SimpleNamespace]:
    """Every socket the head's processes (workers included) and the sweep's own process tree
    listen on while the block runs, polled twice a second."""
    seen = SimpleNamespace(listeners=set(), ours=set())
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            ours = sweep_processes()
            found = ray_head.listeners(ours | {p.pid for p in ray_head.session(sid)})
            seen.listeners.update(found)
            seen.ours.update(pid for _, _, pid in found if pid in ours)
            done.wait(0.5)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join()


@pytest.mark.slow
def test_a_ray_sweep_is_one_parent_with_a_child_per_trial_run_by_the_cluster_workers(ray_cluster, tmp_path):
    start = time.monotonic()
    with watching_listeners(ray_cluster.sid) as seen:
        result = run_cli(tmp_path, "-m", "hydra/launcher=ray", "debug=smoke", "optimizer.lr=1e-3,3e-4",
                         f"hydra.launcher.ray.init.address={ray_cluster.address}",
                         "trainer=cpu",  # no GPU here: the trials ask Ray for none (ray.yaml says why)
                         env=ray_cluster.env)
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = finished_sweep(store_uri(tmp_path), 2)
    assert {c.data.params["sweep.optimizer.lr"] for c in children} == {"0.001", "0.0003"}
    assert parent.data.params["sweep.launcher"] == "RayLauncher"
    assert "sweep FINISHED: 2 trials (2 FINISHED)" in result.stdout

    # Each trial ran in a worker of this head, not in the sweep's process: the process that logged
    # the child run (tunelab.pid) has a stdout file in the head's session logs, and that file
    # says the child run finished.
    logs = ray_head.session_logs(ray_cluster.sid)
    worker_pids = set()
    for child in children:
        pid = child.data.tags["tunelab.pid"]
        outputs = list(logs.glob(f"worker-*-{pid}.out"))
        assert len(outputs) == 1, f"pid {pid} (run {child.info.run_id}) is no worker of the Ray head"
        assert f"run {child.info.run_id} FINISHED" in outputs[0].read_text()
        worker_pids.add(int(pid))

    # The workers wrote where the sweep's process said (TUNELAB_HOME reaches them), not in their
    # own working folder (the head's), and with the head's private umask.
    (sweep_dir,) = (tmp_path / "outputs" / "multiruns").iterdir()
    for child in children:
        folder = Path(child.data.tags["tunelab.output_dir"])
        assert folder.parent == sweep_dir
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert files and all(p.stat().st_mode & 0o077 == 0 for p in files), "a trial's file is readable by others"
    assert not (ray_cluster.folder / "outputs").exists()

    # Nothing listened off 127.0.0.1: the head, its workers, the sweep's own Ray connection. The
    # watcher saw the workers that trained and the sweep's process listen (it was looking).
    assert worker_pids <= {pid for _, _, pid in seen.listeners}
    assert seen.ours, "the sweep's process was never seen listening"
    assert ray_head.off_loopback(sorted(seen.listeners)) == []
    print(f"Ray head up in {ray_cluster.started_in:.0f} s; 2-trial sweep on it: {seconds:.0f} s")


def test_only_loopback_listeners_pass_the_check():
    found = [("127.0.0.1", 1, 1), ("::ffff:127.0.0.1", 2, 1), ("::1", 3, 1),
             ("0.0.0.0", 4, 2), ("::", 5, 2), ("192.0.2.2", 6, 2), ("::ffff:192.0.2.2", 7, 2)]
    assert [port for _, port, _ in ray_head.off_loopback(found)] == [4, 5, 6, 7]


def test_the_printed_sweep_command_asks_no_gpus_where_there_are_none(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    command = ray_head.sweep_command("127.0.0.1:6379", tmp_path)
    assert "hydra.launcher.ray.init.address=127.0.0.1:6379 trainer=cpu " in command  # what docs/cluster.md shows
    assert "num_gpus" not in command
