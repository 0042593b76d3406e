"""Sweeps: the parent MLflow run of a multirun, its summary, and what each trial needs."""
