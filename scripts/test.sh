#!/usr/bin/env bash
# The README's test command: set up (idempotent, cluster engines included), then the whole pytest suite, slow
# end-to-end tests included. Extra arguments go to pytest: scripts/test.sh -m "not slow"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
bash "$ROOT/scripts/setup_clusters.sh"  # Slurm and PostgreSQL, which the cluster tests start
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
