"""Where tunelab's config tree lives."""

from __future__ import annotations

import os
from pathlib import Path

from tunelab.errors import TunelabError


def conf_dir() -> Path:
    """The config root: ``$TUNELAB_CONF``, the copy inside a wheel, or the checkout's ``conf/``."""
    candidates = [os.environ.get("TUNELAB_CONF"), Path(__file__).parents[1] / "_conf", Path(__file__).resolve().parents[3] / "conf"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "train.yaml").is_file():
            return Path(candidate).resolve()
    raise TunelabError("cannot find tunelab's conf/ folder (with train.yaml); set TUNELAB_CONF=/path/to/conf.")
