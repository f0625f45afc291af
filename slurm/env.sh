# The one place for what your cluster needs before bigtrain starts, sourced by slurm/launch.sh (the body
# of slurm/pretrain.sh and slurm/finetune.sh) on every job start (and on every requeue). Edit it for your
# cluster; it runs on the first node of the job, and `srun` carries the environment to every node.

# Modules and the Python environment:
# module load cuda/12.4 gcc/12
# source "$HOME/venvs/bigtrain/bin/activate"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "${SLURM_SUBMIT_DIR:-.}/.venv/bin/activate" ]; then
  . "${SLURM_SUBMIT_DIR:-.}/.venv/bin/activate"   # the repo's own venv, as the README sets it up
fi

# NCCL (multi-node GPU jobs): the network interface and InfiniBand settings of your fabric.
# export NCCL_SOCKET_IFNAME=ib0
# export NCCL_IB_HCA=mlx5
# export NCCL_DEBUG=WARN

# Weights & Biases: online needs WANDB_API_KEY; offline runs sync later with `wandb sync`.
# export WANDB_API_KEY=...
