"""Checks before Hydra creates anything: can tunelab write where the run will write?

Hydra makes the output folder before any tunelab code runs, so an unwritable or full disk would
otherwise surface as a traceback from inside Hydra, or an hour later as a failed checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tunelab.config.groups import group_choices, required_groups
from tunelab.errors import TunelabError

MIN_FREE_MB = 512  # a checkpoint of a base-sized model plus its optimizer state; TUNELAB_MIN_FREE_MB overrides


def output_root(argv: list[str]) -> tuple[Path, str]:
    """Where this command will write, and the setting that decides it."""
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value and "${" not in value:
            return Path(value), key
    home = os.environ.get("TUNELAB_HOME")
    return (Path(home) / "outputs", "TUNELAB_HOME") if home else (Path.cwd() / "outputs", "the current folder")


def check_writable(folder: Path, setting: str, min_free_mb: float | None = None) -> None:
    """The nearest existing ancestor of ``folder`` takes a file, and its disk has room."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    fix = f"choose another folder ({setting})"
    if not existing.is_dir():
        raise TunelabError(f"cannot write run outputs under {folder}: {existing} is a file; {fix}.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise TunelabError(f"cannot write run outputs under {folder}: {existing} is not writable "
                           f"({err.strerror}); {fix}.") from None
    need = float(os.environ.get("TUNELAB_MIN_FREE_MB", MIN_FREE_MB)) if min_free_mb is None else min_free_mb
    free = shutil.disk_usage(existing).free / 2**20
    if free < need:
        raise TunelabError(f"only {free:,.0f} MB free on the disk of {existing}, below the {need:,.0f} MB a run needs "
                           f"for checkpoints; free some space or {fix} (TUNELAB_MIN_FREE_MB sets the threshold).")


def check_required_groups(argv: list[str]) -> None:
    """``optimizer=null`` would reach Hydra as a bare ValueError with a traceback."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in required_groups() and value.strip().lower() in ("null", "none", ""):
            group = key.lstrip("+~")
            raise TunelabError(f"{group}={value}: a run needs a {group}; pick one of {group_choices(group)}.")


def preflight(argv: list[str]) -> None:
    check_required_groups(argv)
    if any(a in ("-h", "--help", "--hydra-help", "--info", "-i", "--cfg", "-c") or a.startswith("--cfg") for a in argv):
        return  # nothing will be written
    check_writable(*output_root(argv))
