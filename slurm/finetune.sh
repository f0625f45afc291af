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
# No training logic here: slurm/launch.sh (shared with slurm/pretrain.sh) has srun start `bigtrain launch`
# once per node; it reads the topology from Slurm (first node = rendezvous master, SLURM_NODEID = node
# rank), starts the processes, and on a preemption signal (after the checkpoint is written) requeues this
# job, which resumes on restart.
set -uo pipefail
# sbatch runs a copy of this script from its spool directory, so the shared body (and slurm/env.sh beside
# it) is found from the submit directory, or with --chdir from the job's working directory.
launch="${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"
[ -f "$launch" ] || launch="$PWD/slurm/launch.sh"
[ -f "$launch" ] || {
  echo "bigtrain: slurm/launch.sh not found in ${SLURM_SUBMIT_DIR:-.} or $PWD: submit from the repository root" \
       "or pass --chdir REPO" >&2; exit 2; }
. "$launch" finetune.sh "$@"
