"""A user's own callback module, outside tunelab's allow-list: tests/trust/test_security.py lets
``tunelab-train`` build it only after ``TUNELAB_ALLOWED_TARGETS=security_probe`` declares it."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class TouchOnFitStart(L.Callback):
    """Creates ``path`` when training starts: proof that the declared target was built and ran."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.path.touch()
