#!/usr/bin/env bash
# MLflow tracking server on 127.0.0.1 with a SQLite store and artifacts in the local object store.
#
#   bash infra/s3/start.sh && bash infra/mlflow/start.sh     start S3 first (artifacts go there)
#   bash infra/mlflow/stop.sh                                  stop it (by its recorded PID)
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5001           what training runs and `mlflow` CLIs use
#   open http://127.0.0.1:5001 in a browser                    the UI (classic runs table:
#                                                             #/experiments/<id>?workflowType=machine_learning)
#
# State: ${WAVEFORGE_INFRA_DIR:-/tmp/waveforge-infra}/mlflow (mlflow.db, mlflow.log, mlflow.pid, env.sh).
# Artifacts: s3://mlflow-artifacts on the SeaweedFS of infra/s3 (the bucket is created here); the
# server proxies them (--serve-artifacts), so clients need no S3 credentials.
# Environment:
#   WAVEFORGE_MLFLOW_PORT     port (default 5001)
#   WAVEFORGE_MLFLOW_WORKERS  server worker processes (default 2)
set -euo pipefail
source "$(dirname "$0")/../lib.sh"

state="$infra_root/mlflow"
s3_env="$infra_root/s3/env.sh"
mlflow="$venv/bin/mlflow"
[ -x "$mlflow" ] || die "$mlflow not found: run bash infra/setup.sh or set WAVEFORGE_VENV"
mkdir -p "$state"

if pid_alive "$state/mlflow.pid" "mlflow"; then
  echo "mlflow: already running (pid $(cat "$state/mlflow.pid"))"
  cat "$state/env.sh"
  exit 0
fi

port=${WAVEFORGE_MLFLOW_PORT:-5001}
workers=${WAVEFORGE_MLFLOW_WORKERS:-2}
"$venv/bin/python" -c "import boto3" 2>/dev/null ||
  die "boto3 is missing in $venv: the server's S3 artifact store needs it (pip install boto3==1.43.117)"
port_free "$port" || die "port 127.0.0.1:$port is in use (set WAVEFORGE_MLFLOW_PORT)"
[ -s "$s3_env" ] && pid_alive "$infra_root/s3/weed.pid" "weed" ||
  die "the object store is not running: start it first with bash infra/s3/start.sh"

# The server reads the S3 endpoint and keys from the environment (MLFLOW_S3_ENDPOINT_URL + AWS_*).
source "$s3_env"
export MLFLOW_S3_ENDPOINT_URL=$AWS_ENDPOINT_URL
bucket=mlflow-artifacts
"$venv/bin/python" - "$bucket" <<'EOF'
import os, sys
import s3fs
fs = s3fs.S3FileSystem(key=os.environ["AWS_ACCESS_KEY_ID"], secret=os.environ["AWS_SECRET_ACCESS_KEY"],
                       client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
if not fs.exists(sys.argv[1]):
    fs.mkdir(sys.argv[1])
EOF

uri="http://127.0.0.1:$port"
echo "export MLFLOW_TRACKING_URI=$uri" >"$state/env.sh"

# No GenAI job runner (an extra process that also holds up the server's exit on SIGTERM for ~30 s).
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$mlflow" server \
  --host 127.0.0.1 --port "$port" --workers "$workers" \
  --backend-store-uri "sqlite:///$state/mlflow.db" \
  --artifacts-destination "s3://$bucket" --serve-artifacts \
  >>"$state/mlflow.log" 2>&1 </dev/null &
echo $! >"$state/mlflow.pid"

# Ready when /health answers 200 (about 10-30 s on 2 cores: workers import mlflow).
code=000
for ((i = 0; i < 240; i++)); do
  code=$(http_status "$uri/health")
  [ "$code" = 200 ] && break
  pid_alive "$state/mlflow.pid" "mlflow" || die "mlflow server exited during start-up; see $state/mlflow.log"
  sleep 0.5
done
[ "$code" = 200 ] || die "mlflow did not answer $uri/health within 120 s; see $state/mlflow.log"
echo "mlflow: server running (pid $(cat "$state/mlflow.pid")), tracking URI $uri, artifacts s3://$bucket"
echo "    store sqlite:///$state/mlflow.db, log $state/mlflow.log; later: source $state/env.sh"
cat "$state/env.sh"
