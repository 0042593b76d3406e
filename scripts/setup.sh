#!/usr/bin/env bash
# Idempotent setup: a virtualenv in the repo (.venv, reused when present), torch and
# torchvision from this machine's local wheels through pip, then tunelab with [dev] extras.
# A stamp of pyproject.toml + this script skips the pip work when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.tunelab-setup"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  echo "[setup] installing ${TORCH_PINS[*]} (local wheels, ~2 min the first time)"
  "$VENV/bin/pip" install -q "${TORCH_PINS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import torch, torchvision" \
    || { echo "[setup] error: torch/torchvision did not install; see the pip output above" >&2; exit 1; }
  echo "[setup] installing tunelab[dev] (editable)"
  "$VENV/bin/pip" install -q -e "$ROOT[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import tunelab, timm, lightning, mlflow, hydra" \
    || { echo "[setup] error: tunelab's dependencies did not install; see the pip output above" >&2; exit 1; }
  echo "$want" > "$stamp"
fi

# Fashion-MNIST ships as a Debian package; install it when we may (root + apt), else say how.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian package dataset-fashion-mnist (for data=fashion_mnist)"
    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }) \
      || echo "[setup] note: could not install dataset-fashion-mnist; data=fashion_mnist will not work"
  else
    echo "[setup] note: for data=fashion_mnist run: sudo apt-get install dataset-fashion-mnist"
  fi
fi
