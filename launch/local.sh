#!/usr/bin/env bash
# Runs a greencode command on this machine, inside the project's virtualenv.
#   launch/local.sh [--dry-run] COMMAND [ARGS...]     e.g. launch/local.sh run configs/demo.yaml
# Multi-host launchers (TPU VM pods, SLURM GPU clusters) arrive with distributed training.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dry=0
[ "${1:-}" = "--dry-run" ] && { dry=1; shift; }
[ $# -ge 1 ] || { echo "usage: launch/local.sh [--dry-run] COMMAND [ARGS...]" >&2; exit 2; }
cmd=("$root/.venv/bin/greencode" "$@")
if [ $dry = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
[ -x "$root/.venv/bin/greencode" ] || "$root/scripts/setup"
exec "${cmd[@]}"
