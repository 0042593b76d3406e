"""Files and folders tunelab creates are the owner's alone (0600 / 0700) unless TUNELAB_UMASK says otherwise.

A run's store, artifacts, checkpoints and configs hold code paths, data paths and models whose
Python runs where they are loaded, so other users of a shared machine must not read or replace
them. A private umask, set once where tunelab starts (every console script's ``main`` and
``tunelab.fit``), rather than a chmod where each file is created: most of these files are
written by libraries (Hydra's output folder and ``.hydra/*.yaml``, Lightning's checkpoints,
MLflow's SQLite store and artifact copies, the ``mlflow server`` that tunelab-ui starts) and by
the processes tunelab starts (DDP ranks, joblib trials, the server), which inherit the umask;
a chmod after the fact would miss files it does not know of and leave a window before it runs.

``TUNELAB_UMASK=022`` (any octal umask) restores group- and world-readable files, e.g. for a
team folder; ``007`` shares with the group.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tunelab.errors import TunelabError

PRIVATE = 0o077  # no permission bit for group or others: files 0600, folders 0700


def chosen_umask() -> int:
    """``TUNELAB_UMASK`` when set (octal), else PRIVATE."""
    text = os.environ.get("TUNELAB_UMASK", "").strip()
    if not text:
        return PRIVATE
    try:
        value = int(text, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o777:
        raise TunelabError(f"TUNELAB_UMASK={text!r} is not an octal umask; use e.g. 077 (private, the default) "
                           "or 022 (group and others may read).")
    return value


def set_for_cli(tool: str) -> None:
    """The first line of a console script's ``main``: the process and all it starts create private files."""
    try:
        os.umask(chosen_umask())
    except TunelabError as err:
        print(f"{tool}: error: {err}", file=sys.stderr)
        sys.exit(2)


@contextmanager
def private_files() -> Iterator[None]:
    """The umask for a call from Python (``tunelab.fit``), restoring the caller's afterwards: a
    notebook's own files are not tunelab's to decide."""
    previous = os.umask(chosen_umask())
    try:
        yield
    finally:
        os.umask(previous)
