"""Records of runs: MLflow runs, tags, resume and pre-emption, links to the UI, plots."""
