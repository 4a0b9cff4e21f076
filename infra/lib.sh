# Shared helpers for infra/*/start.sh and stop.sh (sourced, not run).
#   WAVEFORGE_INFRA_DIR  root of all service state (default /tmp/waveforge-infra); each service uses
#                        $WAVEFORGE_INFRA_DIR/<service>/ for its config, data, logs and pid files.
#   WAVEFORGE_VENV       the Python environment holding `weed` and `mlflow` (default: .venv in the repo).
# Processes are only ever stopped by the PID their start script recorded, never by name.

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
infra_root="${WAVEFORGE_INFRA_DIR:-/tmp/waveforge-infra}"
venv="${WAVEFORGE_VENV:-$repo_root/.venv}"
case "$venv" in /*) ;; *) venv="$repo_root/$venv" ;; esac

die() {
  echo "error: $*" >&2
  exit 1
}

# pid_alive PIDFILE NAME: true when PIDFILE holds the PID of a live process whose command line
# contains NAME (guards against a stale pid file whose PID was reused by something else).
pid_alive() {
  local pidfile=$1 name=$2 pid
  [ -s "$pidfile" ] || return 1
  pid=$(tr -dc '0-9' <"$pidfile")
  [ -n "$pid" ] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$name"
}

# stop_pid PIDFILE NAME [TIMEOUT_S]: SIGTERM the recorded process, wait for it to exit (SIGKILL after
# TIMEOUT_S, default 20), remove the pid file. Prints what it did; no-op if not running.
stop_pid() {
  local pidfile=$1 name=$2 timeout=${3:-20} pid i
  if ! pid_alive "$pidfile" "$name"; then
    rm -f "$pidfile"
    echo "$name: not running"
    return 0
  fi
  pid=$(tr -dc '0-9' <"$pidfile")
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < timeout * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$name (pid $pid) did not exit after ${timeout}s: SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  fi
  # Our start scripts run each service in its own session (setsid): take down any worker it left.
  if group_alive "$pid"; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      group_alive "$pid" || break
      sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  echo "$name: stopped (pid $pid)"
}

# group_alive PGID: true while any process is in process group PGID (read from /proc: no procps needed).
group_alive() {
  local want=$1 stat rest fields
  for stat in /proc/[0-9]*/stat; do
    read -r rest 2>/dev/null <"$stat" || continue
    rest=${rest##*) }  # the fields after "pid (comm) ": state ppid pgrp ...
    read -r -a fields <<<"$rest"
    [ "${fields[2]:-}" = "$want" ] && return 0
  done
  return 1
}

# http_status URL: prints the HTTP status code of a GET (000 if nothing answers). Uses the venv's
# Python so that it needs no curl.
http_status() {
  "$venv/bin/python" - "$1" <<'EOF'
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
EOF
}

# port_free PORT: true when nothing listens on 127.0.0.1:PORT.
port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}
