"""Where runs are recorded when nothing says otherwise."""

from __future__ import annotations

import os
from pathlib import Path


def default_store() -> Path:
    """Where ``tunelab-train`` logs by default: ``$TUNELAB_HOME/outputs`` or ``./outputs``."""
    return Path(os.environ.get("TUNELAB_HOME", ".")).expanduser().resolve() / "outputs" / "mlflow.db"
