"""Trained models leaving training: the model registry and the MLflow pyfunc flavour."""
