# Shared by the slurm/*.sh launchers (sourced from inside the batch job; not submitted by itself).
#
# What a launcher does:
#   * one `srun` task per node, each running torchrun; torchrun's c10d rendezvous is hosted on the first
#     node of the allocation (port MASTER_PORT), so nodes find each other without a fixed master address;
#   * torchrun restarts the workers of a failed attempt up to MAX_RESTARTS times; every attempt starts
#     with trainer.resume=auto and continues from the newest complete checkpoint;
#   * Slurm's warning signal (`#SBATCH --signal=B:USR1@<seconds>`, sent to this batch shell before the
#     time limit) and SIGTERM create the run's stop file (trainer.output_dir/STOP): the trainer saves at
#     the next step boundary and exits, and the job requeues itself (`#SBATCH --requeue`); the requeued
#     job runs this script again with the same arguments and resumes;
#   * Hydra overrides given to sbatch after the script name are passed on, after the launcher's own
#     (`trainer.output_dir`, `trainer.resume=auto`), so a user's value of those wins.
#
# Settings read from the environment of `sbatch` (all optional):
#   MAGI_ROOT        repository checkout on a shared file system (default: the directory sbatch ran in)
#   MAGI_PYTHON      python with magi installed (default: $MAGI_ROOT/.venv/bin/python, else python3)
#   NPROC_PER_NODE   training processes per node (default: the GPUs Slurm gave the node)
#   MASTER_PORT      rendezvous port on the first node (default: 20000 + job id mod 20000)
#   MAX_RESTARTS     torchrun restarts after a failure (default 3)
#   RUN_DIR          trainer.output_dir when none is given as an override (default runs/<job name>-<job id>;
#                    a requeued job keeps its id, so it finds its own checkpoints)
#
# NCCL and CUDA settings (set here unless already set; see README "Training on a cluster"):
#   CUDA_DEVICE_MAX_CONNECTIONS=1   one hardware queue: tensor-parallel communication is ordered with the
#                                   compute it overlaps (megatron-core's requirement for TP overlap)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1  a hung or failed collective aborts the process (so torchrun can
#                                   restart it) instead of blocking forever
#   NCCL_IB_*, NCCL_SOCKET_IFNAME   cluster specific: set them in your environment before sbatch if your
#                                   fabric needs them (e.g. NCCL_SOCKET_IFNAME=^lo,docker)
#   TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1  workers get their own store instead of torchrun's rendezvous store;
#                                   with the shared one a restarted attempt can read the failed attempt's
#                                   addresses and hang or fail to connect (pytorch/pytorch#135712)
#   NCCL_DEBUG=WARN                 raise to INFO to see the transport NCCL picked
#   OMP_NUM_THREADS                 CPUs per task / processes per node (torch's CPU ops and data loading)

set -euo pipefail

magi_setup() {
    MAGI_ROOT="${MAGI_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
    cd "$MAGI_ROOT"
    if [[ -z "${MAGI_PYTHON:-}" ]]; then
        if [[ -x "$MAGI_ROOT/.venv/bin/python" ]]; then MAGI_PYTHON="$MAGI_ROOT/.venv/bin/python"; else MAGI_PYTHON=python3; fi
    fi
    HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    # The rendezvous address is the node's NodeAddr in slurm.conf (a name or an IP that the other nodes
    # reach; it is the node name itself unless the cluster sets one).
    local addr
    addr=$(scontrol show node "$HEAD_NODE" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | head -n 1 | cut -d= -f2 || true)
    HEAD_ADDR="${addr:-$HEAD_NODE}"
    MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    if [[ -z "${NPROC_PER_NODE:-}" ]]; then
        NPROC_PER_NODE="${SLURM_GPUS_ON_NODE:-}"
        if [[ -z "$NPROC_PER_NODE" ]] && command -v nvidia-smi >/dev/null 2>&1; then
            NPROC_PER_NODE=$(nvidia-smi -L | wc -l)
        fi
        NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
    fi
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-1} / NPROC_PER_NODE > 0 ? ${SLURM_CPUS_PER_TASK:-1} / NPROC_PER_NODE : 1 ))}"
    echo "magi: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NUM_NODES:-1} node(s) [${SLURM_JOB_NODELIST}]," \
         "${NPROC_PER_NODE} process(es) per node, rendezvous ${HEAD_ADDR}:${MASTER_PORT}, python ${MAGI_PYTHON}"
}

# The value of the last `key=value` among the arguments (empty if none).
magi_override() {
    local key="$1" value="" arg
    shift
    for arg in "$@"; do
        if [[ "$arg" == "$key="* || "$arg" == "+$key="* || "$arg" == "++$key="* ]]; then value="${arg#*=}"; fi
    done
    printf '%s' "$value"
}

# srun + torchrun of one entry point on every node: magi_torchrun ENTRY ARGS...
magi_torchrun() {
    local entry="$1"
    shift
    srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
        "$MAGI_PYTHON" -m torch.distributed.run \
        --nnodes="${SLURM_JOB_NUM_NODES:-1}" --nproc-per-node="$NPROC_PER_NODE" \
        --rdzv-backend=c10d --rdzv-endpoint="${HEAD_ADDR}:${MASTER_PORT}" --rdzv-id="${SLURM_JOB_ID}" \
        --max-restarts="${MAX_RESTARTS:-3}" \
        "$entry" "$@"
}

# A training job: magi_train_job HYDRA_OVERRIDES...
magi_train_job() {
    magi_setup
    local out
    out=$(magi_override trainer.output_dir "$@")
    out="${out:-${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}}"
    mkdir -p "$out"
    local stop_file="$out/STOP"
    rm -f "$stop_file"  # a request answered by an earlier attempt
    MAGI_STOP_ASKED=0
    # Only a flag and the stop file here: the trainer finishes its step, saves, and exits by itself.
    trap 'MAGI_STOP_ASKED=1; echo "magi: signal received, asking the trainer to save and stop"; touch "'"$stop_file"'"' USR1 TERM
    echo "magi: output ${out}; stop file ${stop_file}"
    magi_torchrun magi_train/train.py "trainer.output_dir=$out" trainer.resume=auto "$@" &
    local pid=$! status=0
    # `wait` returns early when a trapped signal arrives; keep waiting for srun itself.
    while true; do
        status=0
        wait "$pid" || status=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    if [[ "$MAGI_STOP_ASKED" == 1 ]]; then
        echo "magi: training stopped on request (exit ${status}); requeueing job ${SLURM_JOB_ID}"
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    return "$status"
}
