#!/usr/bin/env bash
# One-command set-up of a fresh machine.
#   bash infra/setup.sh          Python environment in .venv (torch, DeepSpeed, webdataset, MLflow, ...)
#   bash infra/setup.sh --dev    the same plus test tools and the system packages the real-service
#                                tests start (Slurm + munge from Debian, Chromium for the MLflow UI test)
# Idempotent: a second run with an unchanged pyproject.toml takes a few seconds.
# WAVEFORGE_VENV overrides the environment's folder (default: .venv in the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
[ "${1:-}" = "--dev" ] && dev=1
venv=${WAVEFORGE_VENV:-.venv}
py=${PYTHON:-python3.11}

if [ "$dev" = 1 ]; then
  bash infra/system_packages.sh
fi

[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
stamp="$venv/.waveforge-setup"
want="$( (sha256sum pyproject.toml infra/setup.sh; pwd) | sha256sum | cut -c1-16)-dev$dev"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: $venv is up to date"
  exit 0
fi
# 1. the torch/torchvision pair first, so that nothing below resolves another torch.
"${pip[@]}" install -q torch==2.14.1 torchvision==0.29.1 "setuptools<81" wheel packaging ninja
# 2. DeepSpeed builds against the torch above only without build isolation.
"${pip[@]}" install -q --no-build-isolation deepspeed==0.19.8
# 3. the platform itself (editable) with its pinned dependencies.
if [ "$dev" = 1 ]; then
  "${pip[@]}" install -q -e ".[dev]"
else
  "${pip[@]}" install -q -e .
fi
echo "$want" > "$stamp"
echo "setup: $venv ready ($("$venv/bin/python" -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null))"
