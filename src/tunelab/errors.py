"""The one exception type users see: a message that says what is wrong and how to fix it."""


class TunelabError(Exception):
    """Bad input (config, data, weights, environment) detected before or during a run.

    The entry points print ``str(error)`` as a single line without a traceback, so the
    message must name the offending key or path, what was expected and what to do.
    """


class TrialPruned(Exception):
    """A sweep trial stopped early by its pruner: recorded as pruned, never as a failure."""


class Preempted(BaseException):
    """SIGTERM arrived (preemption.py). Like KeyboardInterrupt not an ``Exception``, so no
    handler swallows it; ``checkpoint`` is what ``resume=auto`` will continue from."""

    exit_code = 143  # 128 + SIGTERM: what schedulers expect from a job they terminated

    def __init__(self, checkpoint: str | None = None):
        super().__init__("pre-empted (SIGTERM)")
        self.checkpoint = checkpoint
