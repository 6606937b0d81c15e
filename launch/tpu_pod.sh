#!/usr/bin/env bash
# Runs a greencode command on every worker of a Cloud TPU VM pod slice at once.
#   launch/tpu_pod.sh [--dry-run] --tpu NAME --zone ZONE [--project P] [--workdir DIR] COMMAND [ARGS...]
#     e.g. launch/tpu_pod.sh --tpu my-v4-32 --zone us-central2-b finetune configs/llama3.2-3b-python.yaml
# Each worker runs the same command in DIR (default: ~/greencode-jax, which must hold this repository and
# its .venv, set up with scripts/setup) with GREENCODE_DISTRIBUTED=on: jax.distributed.initialize then asks
# the TPU metadata server for the other workers, and each worker's input pipeline reads only its shard.
# Checkpoints (checkpoint.dir) must be on storage every worker sees, e.g. a gs:// bucket path or a shared disk.
# Preemption: the TPU runtime sends SIGTERM to every worker; each saves a checkpoint at the same step and
# exits with status 143. Rerun the same command to resume.
#   --dry-run   print the gcloud command instead of running it
set -euo pipefail
dry=0 tpu="" zone="" project="" workdir='~/greencode-jax'
usage="usage: launch/tpu_pod.sh [--dry-run] --tpu NAME --zone ZONE [--project P] [--workdir DIR] COMMAND [ARGS...]"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1; shift ;;
    --tpu) tpu="${2:?--tpu needs a name}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a zone}"; shift 2 ;;
    --project) project="${2:?--project needs a project}"; shift 2 ;;
    --workdir) workdir="${2:?--workdir needs a directory}"; shift 2 ;;
    --help|-h) echo "$usage"; exit 0 ;;
    *) break ;;
  esac
done
[ -n "$tpu" ] && [ -n "$zone" ] && [ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }

remote="cd $workdir && GREENCODE_DISTRIBUTED=on .venv/bin/greencode"
for arg in "$@"; do remote+=" $(printf '%q' "$arg")"; done
cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone")
[ -n "$project" ] && cmd+=(--project "$project")
cmd+=(--worker=all --command "$remote")
if [ $dry = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
command -v gcloud >/dev/null || { echo "launch/tpu_pod.sh: gcloud not found (install the Google Cloud CLI)" >&2; exit 2; }
exec "${cmd[@]}"
