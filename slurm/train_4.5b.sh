#!/bin/bash
# MAGI-1 4.5B on 2 nodes x 8 GPUs (80 GB class). Submit from the repository root:
#
#   sbatch slurm/train_4.5b.sh data.shards=/data/shards data.val_shards=/data/val
#   sbatch --nodes=4 slurm/train_4.5b.sh data.shards=/data/shards parallel.cp=2
#
# Pure data parallel with full recompute fits 76 GiB at 64k tokens per sequence (~50 GiB per GPU):
#   python tools/estimate_memory.py --model magi1_4.5b --seq-length 65536 --gpu-memory 76 --gpus 16
# Every override after the script name is a Hydra override and wins over the defaults here.
#
#SBATCH --job-name=magi-4.5b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

source "${MAGI_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
magi_train_job model=magi1_4.5b data=webdataset data.seq_length=65536 \
    trainer.precision=bf16 trainer.recompute=full trainer.max_steps=100000 trainer.save_every=500 \
    trainer.log_every=10 trainer.eval_every=1000 trainer.keep_last=3 trainer.progress_bar=false \
    "$@"
