"""tunelab: config-driven fine-tuning of pretrained models (Hydra + Lightning + MLflow)."""

__version__ = "0.1.0"
