#!/bin/bash
# MAGI-1 24B on 8 nodes x 8 GPUs (H100/H200 80 GB class). Submit from the repository root:
#
#   sbatch slurm/train_24b.sh data.shards=/data/shards data.val_shards=/data/val
#   sbatch --nodes=16 slurm/train_24b.sh data.shards=/data/shards parallel.tp=8 parallel.cp=2
#   sbatch slurm/train_24b.sh ... trainer.resume=/ckpt/step_00010000   # start from a given checkpoint
#
# The layout below is the smallest that tools/estimate_memory.py finds for 64 GPUs of 76 GiB at 64k tokens per
# packed sequence (tp=4 with sequence parallel, full recompute: ~50 GiB per GPU); check yours with
#   python tools/estimate_memory.py --model magi1_24b --seq-length 65536 --gpu-memory 76 --gpus 64
# Every override after the script name is a Hydra override and wins over the defaults here.
#
#SBATCH --job-name=magi-24b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600

source "${MAGI_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
magi_train_job model=magi1_24b data=webdataset data.seq_length=65536 \
    parallel.tp=4 parallel.sequence_parallel=true \
    trainer.precision=bf16 trainer.recompute=full trainer.max_steps=100000 trainer.save_every=500 \
    trainer.log_every=10 trainer.eval_every=1000 trainer.keep_last=3 trainer.progress_bar=false \
    "$@"
