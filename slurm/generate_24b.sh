#!/bin/bash
# MAGI-1 24B generation on one node of 8 GPUs (context parallel over 8: one video, same result as one GPU).
# With `sbatch --nodes=N` the context-parallel group spans every process of the job (N x 8). Submit from the
# repository root:
#
#   sbatch slurm/generate_24b.sh ckpt.dir=/ckpt/magi/24B_distill text.t5_dir=/ckpt/t5 vae.dir=/ckpt/vae \
#       prompt="A red fox runs through snow" output=outputs/fox.mp4
#   sbatch slurm/generate_24b.sh model=magi1_24b_distill_fp8 ... mode=i2v image=cat.png
#
# Every override after the script name is a Hydra override of conf/generate.yaml. A generation is not
# resumed: no requeue, and a failed rank fails the job (MAX_RESTARTS=0).
#
#SBATCH --job-name=magi-gen-24b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=02:00:00
#SBATCH --output=slurm/logs/%x-%j.out

export MAX_RESTARTS="${MAX_RESTARTS:-0}"
source "${MAGI_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
magi_setup
mkdir -p outputs
# One replica over the whole job (generate refuses a world that is not tp x cp x pp); an override such as
# parallel.cp=8 parallel.pp=2 after the script name wins.
MAGI_CP=$(( ${SLURM_JOB_NUM_NODES:-1} * NPROC_PER_NODE ))
echo "magi: generating with parallel.cp=${MAGI_CP} (${SLURM_JOB_NUM_NODES:-1} node(s) x ${NPROC_PER_NODE})"
magi_torchrun magi_infer/generate.py model=magi1_24b_distill parallel.cp="$MAGI_CP" \
    output="outputs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}.mp4" "$@"
