"""``tunelab-train``'s real ``main()`` run inside the test process, for tests about what a command
line is refused with (one line, exit status, nothing written): the same code path as the console
script without a fresh interpreter's ~8 s of imports. Every test that trains keeps a real process
(``conftest.run_cli``).

Everything the command changes in the process is put back afterwards: environment, working
directory, argv, umask, Hydra's global state, the logging handlers Hydra installs and the frozen
allow-list.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from pathlib import Path


@contextlib.contextmanager
def _restored_process():
    environ, cwd, argv = dict(os.environ), os.getcwd(), list(sys.argv)
    umask = os.umask(0o022)
    os.umask(umask)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    loggers = {name: (list(lg.handlers), lg.level, lg.propagate) for name, lg in logging.root.manager.loggerDict.items()
               if isinstance(lg, logging.Logger)}
    from tunelab.config import targets

    frozen = targets._user_declared
    try:
        yield
    finally:
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.hydra_config import HydraConfig

        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
        targets._user_declared = frozen
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, (saved, lvl, propagate) in loggers.items():
            logger = logging.getLogger(name)
            logger.handlers[:], logger.propagate = saved, propagate
            logger.setLevel(lvl)
        os.umask(umask)
        os.chdir(cwd)
        sys.argv[:] = argv
        os.environ.clear()
        os.environ.update(environ)


def run_train(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``tunelab-train *args`` as ``conftest.run_cli`` runs it (cwd and TUNELAB_HOME ``tmp_path``,
    no MLFLOW_TRACKING_URI unless ``env`` sets one), in this process."""
    from tunelab.cli.train import main

    tmp_path.mkdir(parents=True, exist_ok=True)
    out, err = io.StringIO(), io.StringIO()
    with _restored_process():
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ.update({"TUNELAB_HOME": str(tmp_path), **(env or {})})
        os.chdir(tmp_path)
        sys.argv[:] = ["tunelab-train", *args]
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
    return subprocess.CompletedProcess(["tunelab-train", *args], code, out.getvalue(), err.getvalue())
