#!/usr/bin/env bash
# The prepared GPU check for an offline GPU node: installs the wheelhouse (scripts/make_wheelhouse.sh
# built it on a connected machine) into a private folder, then runs scripts/gpu_check.py.
#   bash scripts/gpu_check.sh OUT_DIR [gpu_check.py options]     e.g. --work /tmp/gpu-work
# Needs only python3 with torch, torchvision, lightning, timm, transformers and torchmetrics.
# Environment: WHEELHOUSE (default: wheelhouse/ in the checkout), PYTHON (default: python3).
set -euo pipefail
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,6p' "$0" | cut -c3-
  exit 0
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELHOUSE="${WHEELHOUSE:-$ROOT/wheelhouse}"
SITE="$(mktemp -d "${TMPDIR:-/tmp}/tunelab-site.XXXXXX")"
trap 'rm -rf "$SITE"' EXIT
if compgen -G "$WHEELHOUSE/*.whl" >/dev/null; then
  echo "[gpu_check] installing $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels from $WHEELHOUSE into $SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$SITE" "$WHEELHOUSE"/*.whl
else
  echo "[gpu_check] no wheels in $WHEELHOUSE: using the packages $PYTHON already has"
fi
# tunelab runs from the source tree: its config is read from conf/ beside src/
export PYTHONPATH="$SITE:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset MLFLOW_TRACKING_URI  # the runs log to SQLite stores inside the work folder
exec "$PYTHON" "$ROOT/scripts/gpu_check.py" "$@"
