#!/usr/bin/env bash
# The README's run command: set up (idempotent), then the main job: the shipped ImageNet
# EfficientNet-Lite0 fine-tuned on the shipped MNIST-5k (head first, then all layers),
# logged to ./outputs/mlflow.db. Extra arguments are Hydra overrides: scripts/run.sh debug=smoke
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/tunelab-train" "$@"
