#!/usr/bin/env bash
# Stop the SeaweedFS started by infra/s3/start.sh (SIGTERM to its recorded PID, wait for exit).
#   bash infra/s3/stop.sh
# Data, credentials and the log stay in ${WAVEFORGE_INFRA_DIR:-/tmp/waveforge-infra}/s3 (delete that
# folder to start from empty).
set -euo pipefail
source "$(dirname "$0")/../lib.sh"

state="$infra_root/s3"
stop_pid "$state/weed.pid" "weed" 30
rm -f "$state/filer.sock" "$state/s3.sock"
# weed leaves its gRPC unix sockets in /tmp, named after our ports: remove them once it has exited.
if [ -s "$state/ports" ] && ! pid_alive "$state/weed.pid" weed; then
  for p in $(cat "$state/ports"); do
    rm -f /tmp/seaweedfs-*-grpc-$((p + 10000)).sock "/tmp/seaweedfs-s3-$p.sock"
  done
fi
