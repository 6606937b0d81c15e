#!/usr/bin/env bash
# Submits a greencode command as a SLURM job: one process per GPU, all nodes together.
#   launch/slurm.sh [--dry-run] --nodes N --gpus-per-node G [--partition P] [--account A] [--time HH:MM:SS]
#                   [--cpus-per-task C] [--job-name NAME] COMMAND [ARGS...]
#     e.g. launch/slurm.sh --nodes 2 --gpus-per-node 8 --time 24:00:00 finetune configs/opt-2.7b-java.yaml
# srun starts N x G tasks; in each, jax.distributed.initialize reads SLURM's variables (SLURM_NTASKS > 1 is
# detected) and takes GPU number SLURM_LOCALID of its node, so every task sees all of its node's GPUs
# (--gres, not --gpus-per-task). Each process's input pipeline reads only its shard of every batch.
# SLURM sends SIGTERM two minutes before the time limit (--signal): every process saves a checkpoint at
# the same step and exits with 143; the job is requeued and resumes from that checkpoint.
# checkpoint.dir and the run directory must be on a filesystem all nodes share.
#   --dry-run   print the batch script and the sbatch command instead of submitting
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dry=0 nodes="" gpus="" partition="" account="" time_limit="24:00:00" cpus=8 name="greencode"
usage="usage: launch/slurm.sh [--dry-run] --nodes N --gpus-per-node G [--partition P] [--account A] [--time T] [--cpus-per-task C] [--job-name NAME] COMMAND [ARGS...]"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1; shift ;;
    --nodes) nodes="${2:?}"; shift 2 ;;
    --gpus-per-node) gpus="${2:?}"; shift 2 ;;
    --partition) partition="${2:?}"; shift 2 ;;
    --account) account="${2:?}"; shift 2 ;;
    --time) time_limit="${2:?}"; shift 2 ;;
    --cpus-per-task) cpus="${2:?}"; shift 2 ;;
    --job-name) name="${2:?}"; shift 2 ;;
    --help|-h) echo "$usage"; exit 0 ;;
    *) break ;;
  esac
done
[ -n "$nodes" ] && [ -n "$gpus" ] && [ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
for n in "$nodes" "$gpus" "$cpus"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "launch/slurm.sh: --nodes, --gpus-per-node and --cpus-per-task must be positive integers" >&2; exit 2; }
done

command_line=".venv/bin/greencode"
for arg in "$@"; do command_line+=" $(printf '%q' "$arg")"; done
script="#!/usr/bin/env bash
#SBATCH --job-name=$name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$gpus
#SBATCH --gres=gpu:$gpus
#SBATCH --cpus-per-task=$cpus
#SBATCH --time=$time_limit
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=$root/runs/slurm-%x-%j.out"
[ -n "$partition" ] && script+=$'\n'"#SBATCH --partition=$partition"
[ -n "$account" ] && script+=$'\n'"#SBATCH --account=$account"
script+="
set -uo pipefail
cd $(printf '%q' "$root")
srun --kill-on-bad-exit=1 $command_line
status=\$?
# 143: stopped by SIGTERM after saving a checkpoint (time limit, preemption): requeue to resume
if [ \$status = 143 ]; then scontrol requeue \"\$SLURM_JOB_ID\"; fi
exit \$status
"
if [ $dry = 1 ]; then
  printf '%s\n' "$script"
  echo "# would run: sbatch <the script above>"
  exit 0
fi
command -v sbatch >/dev/null || { echo "launch/slurm.sh: sbatch not found (not on a SLURM login node?)" >&2; exit 2; }
mkdir -p "$root/runs"
printf '%s\n' "$script" | sbatch
