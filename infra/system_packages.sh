#!/usr/bin/env bash
# Debian packages that the real-service tests start: Slurm (slurmctld, slurmd) with munge, and
# Chromium for the headless MLflow UI check. Skips what is already installed.
set -euo pipefail
need=()
command -v slurmctld >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null || need+=(munge)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
echo "system packages: slurm $(slurmctld -V 2>/dev/null | cut -d' ' -f2), munge, chromium present"
