#!/usr/bin/env bash
# Stop the MLflow server started by infra/mlflow/start.sh (SIGTERM to its recorded PID, which also
# stops its worker processes; wait for exit).
#   bash infra/mlflow/stop.sh
# The SQLite store and the log stay in ${WAVEFORGE_INFRA_DIR:-/tmp/waveforge-infra}/mlflow.
set -euo pipefail
source "$(dirname "$0")/../lib.sh"

state="$infra_root/mlflow"
stop_pid "$state/mlflow.pid" "mlflow" 30
