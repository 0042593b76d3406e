"""tunelab: config-driven fine-tuning of pretrained models (Hydra + Lightning + MLflow).

``tunelab.fit(overrides)`` trains a run and ``tunelab.check(overrides)`` validates one from
Python (see tunelab.api); both are imported on first use, so ``import tunelab`` stays light.
"""

__version__ = "0.1.0"
__all__ = ["check", "fit"]


def __getattr__(name: str):
    if name in __all__:
        from tunelab import api

        return getattr(api, name)
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
