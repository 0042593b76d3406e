"""What every tunelab command does the same way: how it starts, and how it ends on bad input."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tunelab.errors import TunelabError
from tunelab import umask

BAD_INPUT_EXIT = 2


def start(prog: str) -> None:
    """Private files (tunelab/umask.py), and no model hub at run time: a name that is not a local
    folder or already cached fails instead of downloading."""
    umask.set_for_cli(prog)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def fail(prog: str, err: object) -> None:
    """One line on stderr and exit status 2: what every command does with a TunelabError."""
    print(f"{prog}: error: {err}", file=sys.stderr)
    sys.exit(BAD_INPUT_EXIT)


@contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    try:
        yield
    except TunelabError as err:
        fail(prog, err)
