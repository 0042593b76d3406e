"""Training: the Lightning module, strategies and stages, callbacks, evaluation, distributed ranks."""
