#!/usr/bin/env bash
# Runs a greencode command on this machine, inside the project's virtualenv.
#   launch/local.sh [--dry-run] [--processes N] [--cpu-devices K] COMMAND [ARGS...]
#     e.g. launch/local.sh run configs/quickstart.yaml
#          launch/local.sh finetune configs/stdlib-scratch.yaml train.steps=100
#          launch/local.sh --processes 2 finetune configs/stdlib-scratch.yaml   # jax.distributed on localhost
#   --processes N     start N coordinated processes (GREENCODE_COORDINATOR=localhost:$GREENCODE_PORT,
#                     GREENCODE_NUM_PROCESSES, GREENCODE_PROCESS_ID); waits for all, fails if any fails
#   --cpu-devices K   give each process K fake CPU devices (JAX_PLATFORMS=cpu,
#                     XLA_FLAGS=--xla_force_host_platform_device_count=K): try a mesh without accelerators
#   --dry-run         print what would run (one line per process) and exit
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dry=0 processes=1 cpu_devices=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1; shift ;;
    --processes) processes="${2:?--processes needs a number}"; shift 2 ;;
    --cpu-devices) cpu_devices="${2:?--cpu-devices needs a number}"; shift 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "usage: launch/local.sh [--dry-run] [--processes N] [--cpu-devices K] COMMAND [ARGS...]" >&2; exit 2; }
[[ "$processes" =~ ^[1-9][0-9]*$ ]] || { echo "launch/local.sh: --processes must be a positive integer" >&2; exit 2; }
[[ "$cpu_devices" =~ ^[0-9]+$ ]] || { echo "launch/local.sh: --cpu-devices must be a number" >&2; exit 2; }
cmd=("$root/.venv/bin/greencode" "$@")
port="${GREENCODE_PORT:-12355}"

envs_for() {  # the environment of process $1, as NAME=VALUE words
  local e=()
  if [ "$cpu_devices" -gt 0 ]; then
    e+=("JAX_PLATFORMS=cpu" "XLA_FLAGS=--xla_force_host_platform_device_count=$cpu_devices")
  fi
  if [ "$processes" -gt 1 ]; then
    e+=("GREENCODE_COORDINATOR=localhost:$port" "GREENCODE_NUM_PROCESSES=$processes" "GREENCODE_PROCESS_ID=$1")
  fi
  if [ ${#e[@]} -gt 0 ]; then printf '%s\n' "${e[@]}"; fi
}

if [ $dry = 1 ]; then
  for ((i = 0; i < processes; i++)); do
    mapfile -t e < <(envs_for "$i")
    if [ ${#e[@]} -gt 0 ]; then printf 'env'; printf ' %q' "${e[@]}"; printf ' '; fi
    printf '%q ' "${cmd[@]}"; echo
  done
  exit 0
fi
[ -x "$root/.venv/bin/greencode" ] || "$root/scripts/setup"
if [ "$processes" = 1 ]; then
  mapfile -t e < <(envs_for 0)
  exec env "${e[@]+"${e[@]}"}" "${cmd[@]}"
fi
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT  # pass preemption on: every process saves and stops
for ((i = 0; i < processes; i++)); do
  mapfile -t e < <(envs_for "$i")
  env "${e[@]}" "${cmd[@]}" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { s=$?; [ $status = 0 ] && status=$s; }
done
exit $status
