"""tunelab's Optuna sweeper for Hydra (optuna 5.x, pruning, resumable studies).

Hydra only instantiates sweepers that live under the ``hydra_plugins`` namespace package,
and imports every module here at start-up, so nothing heavy is imported at module level.
"""
