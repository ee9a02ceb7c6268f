#!/bin/bash
# MAGI-1 24B generation on one node of 8 GPUs (context parallel over 8: one video, same result as one GPU).
# Submit from the repository root:
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
magi_torchrun magi_infer/generate.py model=magi1_24b_distill parallel.cp="$NPROC_PER_NODE" \
    output="outputs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}.mp4" "$@"
