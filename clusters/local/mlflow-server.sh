#!/usr/bin/env bash
# An MLflow tracking server for this machine: SQLite store and artifacts under runs/, bound to 127.0.0.1.
#
#   bash clusters/local/mlflow-server.sh                 # http://127.0.0.1:5000
#   MLFLOW_TRACKING_URI=http://127.0.0.1:5000 t2v demo     # log to it instead of the SQLite file directly
#
# Set MLFLOW_HOST=0.0.0.0 only to serve other machines (e.g. a Ray cluster), behind a firewall or an
# authenticating proxy: the server has no login of its own.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${T2V_VENV:-$root/.venv}"
state="${T2V_MLFLOW_DIR:-$root/runs}"
mkdir -p "$state/mlartifacts"
exec "$venv/bin/mlflow" server \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" \
  --backend-store-uri "sqlite:///$state/mlflow.db" \
  --artifacts-destination "$state/mlartifacts" --serve-artifacts "$@"
