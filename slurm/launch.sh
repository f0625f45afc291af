# The body shared by slurm/pretrain.sh and slurm/finetune.sh, which differ only in their #SBATCH lines.
# Sourced (never run) on every job start and requeue, as
#   . launch.sh SCRIPT RECIPE [section.key=value ...]      SCRIPT: the caller's name, for the usage line
# It sources slurm/env.sh, runs `bigtrain prepare` as a one-task step, then starts `bigtrain launch` once per
# node with srun and waits for it. The batch
# shell itself may get the preemption signal too (`--signal=B:USR1@N`, `scancel --signal=USR1 --full` or
# `--batch`): it passes the signal on to the training step instead of dying of it (a batch shell that dies
# ends the job, so the launcher would find it COMPLETING and not requeue it).

script=$1
shift
[ $# -ge 1 ] || { echo "usage: sbatch slurm/$script RECIPE [section.key=value ...]" >&2; exit 2; }
env_file="${BIGTRAIN_SLURM_ENV:-$(dirname "${BASH_SOURCE[0]}")/env.sh}"   # the env.sh beside this file
[ -f "$env_file" ] && . "$env_file"
echo "bigtrain: job ${SLURM_JOB_ID:-?} start ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}: $*"

# A preemption signal to this shell goes to the training step once. `scancel --signal` without --full
# reaches every process of the job's steps on every node, and not this shell, so nothing comes back here.
# (Not `kill` to srun: srun passes SIGUSR1 on but turns a SIGTERM into SIGKILL for its tasks.) The step
# may get the same signal directly as well (`--full`); any number of copies still means one stop: each
# training process only sets a flag, all ranks checkpoint together at the next step, and one launcher
# (node 0) requeues. Later arrivals are not passed on: the step already has the request, and a copy
# arriving after training has stopped could only get in the launcher's way.
# Only a RUNNING job is signalled: when the job itself is ending (`scancel JOBID`, the time limit, the
# launcher's own requeue) Slurm has signalled the step already, and scancel would retry a job in that
# state for a minute and more, holding up the end of this start. `timeout` bounds that retry should the
# job stop running between the two commands.
forwarded=
interrupted=
pass_on() {   # $1: the signal name, USR1 or TERM
  interrupted=1
  [ -z "$forwarded" ] && [ -n "${SLURM_JOB_ID:-}" ] || return 0
  [ "$(squeue -h -j "$SLURM_JOB_ID" -o %T 2>/dev/null)" = RUNNING ] || return 0
  if timeout 10 scancel -Q --signal="$1" "$SLURM_JOB_ID"; then
    forwarded=$1
    echo "bigtrain: batch shell got SIG$1: passed on to the training step"
  fi
}
trap 'pass_on USR1' USR1
trap 'pass_on TERM' TERM

# The data first, as a step of its own (one task on the first node, all its CPUs): no training rank waits
# while a corpus is tokenized and packed. On a restart (requeue) the cache is there and this only opens it
# (file sizes and index; its checksums were verified once, when it was made).
echo "bigtrain: preparing the data: bigtrain prepare $*"
srun --nodes=1 --ntasks=1 bigtrain prepare "$@" || { status=$?; echo "bigtrain: data preparation failed (exit $status)" >&2; exit "$status"; }

# srun in the background and `wait` for it, because bash runs a trap only between commands: with srun in
# the foreground the signal would be passed on only after training had ended. A trapped signal also ends
# `wait` early (status > 128), so wait again until srun itself has ended, and exit with its status
# (0 done, 75 preempted and requeued).
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bigtrain launch --requeue "$@" &
step=$!
interrupted=1
while [ -n "$interrupted" ]; do
  interrupted=
  wait "$step"
  status=$?
done
exit "$status"
