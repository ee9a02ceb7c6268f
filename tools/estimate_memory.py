"""Print the training memory of one GPU for a model preset and a parallel layout (magi_train/observability/memory_plan.py
says what is counted), or search the smallest layout that fits a GPU.

    python tools/estimate_memory.py --model magi1_24b --tp 8 --cp 2 --pp 1 --dp 4 --seq-length 32768 \
        --precision bf16 --recompute full
    python tools/estimate_memory.py --model magi1_24b --seq-length 32768 --gpu-memory 80 --gpus 64

The first prints parameters, gradients, optimizer state, activations and their total in GiB for the most
loaded rank. With --gpu-memory (GiB per GPU) and --gpus it also searches every layout of that many GPUs (tp in
1, 2, 4, 8 within the head counts, cp, pp dividing num_layers, sequence parallel on/off, recompute none /
selective / full) and prints the smallest model-parallel one (fewest tp x cp x pp GPUs, then least memory)
that fits. Leave a few GiB of --gpu-memory for the CUDA context and allocator fragmentation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magi_train.config import ConfigError, load_model_preset  # noqa: E402
from magi_train.observability.memory_plan import (  # noqa: E402
    ATTENTION, BACKEND_FAMILY, GIB, PRECISIONS, RECOMPUTE, Layout, MemoryEstimate, MicroBatch, ModelParams, estimate,
    estimates, search, with_defaults,
)


def print_table(title: str, est: MemoryEstimate) -> None:
    print(f"\n{title}\n")
    print("| per GPU | GiB |")
    print("|---|---:|")
    for name, value in est.rows():
        print(f"| {name} | {value / GIB:.2f} |")
    print(f"\n(pipeline stage {est.stage}; one layer, one micro-batch saves {est.per_layer / GIB:.3f} GiB; "
          f"backward working set {est.working / GIB:.2f} GiB; attention metadata {est.attention_metadata / 2**20:.1f} "
          f"MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="magi1_24b", help="preset name: conf/model/<name>.yaml")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--recompute", choices=RECOMPUTE, default="none")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16", help="trainer.precision (bf16 = autocast)")
    parser.add_argument("--seq-length", type=int, default=32768, help="video tokens per sample / packed sequence")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--chunk-tokens", type=int, default=0,
                        help="tokens per chunk (default: one 720p chunk, chunk_width x 45 x 80 tokens)")
    parser.add_argument("--caption-length", type=int, default=0, help="padded caption rows (default: caption_max_length)")
    parser.add_argument("--caption-tokens", type=int, default=0, help="valid caption tokens (default: all rows)")
    parser.add_argument("--attention", choices=ATTENTION, default=None,
                        help="flash: GPU kernels (MagiAttention, flash-attn, flex); torch: the CPU reference kernel "
                             "(and sdpa); default: what --attention-backend saves like")
    parser.add_argument("--attention-backend", choices=sorted(BACKEND_FAMILY), default="",
                        help="model.attention_backend whose range-derived memory is counted (sdpa: a dense T x T "
                             "mask per call; flex: a BlockMask per forward; flash: its gathered keys); "
                             "default: magi for --attention flash, torch for torch")
    parser.add_argument("--gpu-memory", type=float, help="GiB per GPU: search the smallest layout that fits")
    parser.add_argument("--gpus", type=int, help="GPUs of the job (with --gpu-memory)")
    args = parser.parse_args()

    try:
        cfg = load_model_preset(args.model)
    except ConfigError as e:
        parser.error(str(e))
    chunk = args.chunk_tokens or cfg.chunk_width // cfg.t_patch_size * (720 // 8 // cfg.patch_size) * (1280 // 8 // cfg.patch_size)
    attention = args.attention or BACKEND_FAMILY.get(args.attention_backend, "flash")
    try:
        mb = MicroBatch(args.seq_length, args.micro_batch_size, min(chunk, args.seq_length), args.caption_length,
                        args.caption_tokens, attention, args.attention_backend)
    except ValueError as e:
        parser.error(str(e))
    params = ModelParams.of(cfg)
    shown = with_defaults(mb, cfg)
    print(f"{args.model}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, params {cfg.params_dtype}; "
          f"micro-batch {mb.micro_batch_size} x {mb.seq_length} tokens (chunks of {shown.chunk_tokens}), "
          f"captions {shown.caption_tokens}/{shown.caption_length} tokens, {mb.attention} attention "
          f"(model.attention_backend={mb.attention_backend})")
    layout = Layout(args.tp, args.cp, args.pp, args.dp, args.sequence_parallel, args.recompute, args.precision)
    print_table(layout.describe(), estimate(cfg, layout, mb, params))

    if args.gpu_memory is None:
        return
    if not args.gpus:
        parser.error("--gpu-memory needs --gpus (the GPUs of the job)")
    budget = int(args.gpu_memory * GIB)
    found = search(cfg, args.gpus, budget, mb, args.precision, params=params)
    if found is None:
        # Say how far off the best layout is.
        rows = list(estimates(cfg, args.gpus, mb, args.precision, params=params))
        detail = ""
        if rows:
            layout, est = min(rows, key=lambda row: row[1].total)
            detail = f"; the least memory any layout needs is {est.total / GIB:.1f} GiB ({layout.describe()})"
        else:
            detail = " (no valid layout: check that --seq-length divides by tp x cp and --gpus by the sizes)"
        print(f"\nNo layout of {args.gpus} GPUs fits {args.gpu_memory:g} GiB per GPU{detail}.")
        sys.exit(1)
    best, est = found
    print_table(f"Smallest layout of {args.gpus} GPUs that fits {args.gpu_memory:g} GiB: {best.describe()} "
                f"({best.model_parallel} GPU(s) per model replica)", est)


if __name__ == "__main__":
    main()
