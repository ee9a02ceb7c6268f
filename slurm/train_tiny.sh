#!/bin/bash
# The tiny preset on one node (CPU or GPU): a smoke test of the cluster setup, and what tests/e2e/test_slurm.py
# submits to a real single-node Slurm.
#
#   sbatch slurm/train_tiny.sh                                   # experiment=tiny, 2 processes
#   sbatch slurm/train_tiny.sh trainer.max_steps=50 parallel.tp=2 # Hydra overrides pass through
#
#SBATCH --job-name=magi-tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:30:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@60

export NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
source "${MAGI_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
magi_train_job experiment=tiny trainer.progress_bar=false "$@"
