#!/usr/bin/env bash
# Stop the private Slurm cluster of infra/slurm/start.sh: cancel its jobs, then stop slurmd(s),
# slurmctld and munged by the PIDs in their pid files, waiting for each to exit.
#   bash infra/slurm/stop.sh
# Config, logs and the munge key stay in ${WAVEFORGE_INFRA_DIR:-/tmp/waveforge-infra}/slurm.
set -euo pipefail
source "$(dirname "$0")/../lib.sh"

state="$infra_root/slurm"
conf="$state/slurm.conf"
if pid_alive "$state/slurmctld.pid" slurmctld; then
  # Cancel what still runs so that no job step outlives its slurmd, and give steps a moment to end.
  jobs=$(SLURM_CONF=$conf squeue -h -o %i 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086
    SLURM_CONF=$conf scancel $jobs 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
      [ -z "$(SLURM_CONF=$conf squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null)" ] && break
      sleep 0.1
    done
    echo "slurm: cancelled job(s) $(echo $jobs | tr '\n' ' ')"
  fi
fi
for pidfile in "$state"/slurmd-*.pid; do
  [ -e "$pidfile" ] || continue
  stop_pid "$pidfile" slurmd 20
done
stop_pid "$state/slurmctld.pid" slurmctld 20
stop_pid "$state/munge/munged.pid" munged 10
