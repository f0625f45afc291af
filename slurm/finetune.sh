#!/usr/bin/env bash
# Fine-tune on a Slurm cluster — the recipe and its overrides are the arguments:
#   sbatch slurm/finetune.sh recipes/finetune/bert-base-classify.yaml model.init_from=runs/bert-base-mlm
#   sbatch --nodes 2 slurm/finetune.sh recipes/finetune/llama-1b-sft.yaml model.init_from=runs/llama-1b
#   sbatch -p PARTITION -A ACCOUNT slurm/finetune.sh RECIPE            # pick partition and account
# Any #SBATCH line below can be overridden on the sbatch command line (the command line wins).
# CPU-only partition: sbatch --gpus-per-node=0 --cpus-per-task=N ... (one process per CPU slot).
#
#SBATCH --job-name=bigtrain-finetune
#SBATCH --nodes=1                   # nodes; `bigtrain launch` runs once on each
#SBATCH --ntasks-per-node=1         # one launcher per node; it starts one training process per GPU
#SBATCH --gpus-per-node=8           # GPUs per node
#SBATCH --cpus-per-task=64          # CPU cores per node (data loading, the launcher)
#SBATCH --time=04:00:00             # wall-clock limit per job start; longer runs continue on requeue
#SBATCH --signal=USR1@120           # 120 s before the limit: checkpoint at the next step, exit, requeue
#SBATCH --requeue                   # a preempted job goes back to the queue and resumes
#SBATCH --open-mode=append          # a requeued job appends to the same log
#SBATCH --output=slurm-%x-%j.out    # one log per job: slurm-bigtrain-finetune-JOBID.out
#
# No training logic here: srun starts `bigtrain launch` once per node; it reads the topology from
# Slurm (first node = rendezvous master, SLURM_NODEID = node rank), starts the processes, and on a
# preemption signal (after the checkpoint is written) requeues this job, which resumes on restart.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: sbatch slurm/finetune.sh RECIPE [section.key=value ...]" >&2; exit 2; }
env_file="${BIGTRAIN_SLURM_ENV:-${SLURM_SUBMIT_DIR:-.}/slurm/env.sh}"
[ -f "$env_file" ] && . "$env_file"
echo "bigtrain: job ${SLURM_JOB_ID:-?} start ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}: $*"
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bigtrain launch --requeue "$@"
