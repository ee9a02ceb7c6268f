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

Fine-tuning (memory_plan_params.py): --lora-rank R (with --lora-targets, --lora-dropout, --base-dtype) plans a LoRA
run (frozen base, fp32 adapters), --freeze PATTERN a full fine-tune with a frozen part. --height / --width (pixels)
and --chunks give the clip instead of --seq-length / --chunk-tokens. --fit GIB searches the cheapest setting of the
given layout that fits GIB per GPU (memory_plan_fit.py: recompute, micro-batch, frozen-base dtype, chunks, rank):

    python tools/estimate_memory.py --model magi1_4.5b --lora-rank 16 --height 480 --width 832 --chunks 4 --fit 22.8
    python tools/estimate_memory.py --fine-tune-table      # the README's table: 4.5B at 480p on one 24 / 80 GiB GPU
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magi_train.config import ConfigError, load_model_preset  # noqa: E402
from magi_train.observability.memory_plan import (  # noqa: E402
    ATTENTION, BACKEND_FAMILY, BASE_DTYPES, DEFAULT_LORA_TARGETS, GIB, PRECISIONS, RECOMPUTE, Layout, MemoryEstimate,
    MicroBatch, ModelParams, Tuning, estimate, estimates, search, with_defaults,
)

VAE_STRIDE = 8  # pixels per latent pixel (the MAGI-1 VAE); 4 video frames per latent frame
USABLE = 0.95  # of a GPU's memory the table plans with: the rest is the CUDA context and fragmentation (80 -> 76)


def print_table(title: str, est: MemoryEstimate) -> None:
    print(f"\n{title}\n")
    print("| per GPU | GiB |")
    print("|---|---:|")
    for name, value in est.rows():
        print(f"| {name} | {value / GIB:.2f} |")
    print(f"\n(pipeline stage {est.stage}; one layer, one micro-batch saves {est.per_layer / GIB:.3f} GiB; "
          f"backward working set {est.working / GIB:.2f} GiB; attention metadata {est.attention_metadata / 2**20:.1f} "
          f"MiB)")


def clip_tokens(cfg, height: int, width: int) -> int:
    """Tokens of one chunk of a height x width clip (latent VAE_STRIDE, patch_size, chunk_width latent frames)."""
    for name, px in (("--height", height), ("--width", width)):
        if px % (VAE_STRIDE * cfg.patch_size):
            raise ValueError(f"{name} {px} is not a multiple of {VAE_STRIDE * cfg.patch_size} pixels "
                             f"(VAE stride {VAE_STRIDE} x patch {cfg.patch_size})")
    return (cfg.chunk_width // cfg.t_patch_size) * (height // VAE_STRIDE // cfg.patch_size) * \
        (width // VAE_STRIDE // cfg.patch_size)


def fit_rows(cfg, tuning: Tuning, mb: MicroBatch, gib: float, layout: Layout, fp8: bool) -> list:
    """(setting text, estimate GiB, text of the next cheaper setting and its GiB) of the cheapest fitting setting."""
    from magi_train.observability.memory_plan_fit import fit

    found = fit(cfg, int(gib * GIB), mb, tuning, layout, fp8_base=fp8)
    layers = cfg.num_layers // layout.pp
    if found is None:
        return None
    prev = "-" if found.previous is None else \
        f"{found.previous[0].describe(layers)}: {found.previous[1].total / GIB:.1f} GiB"
    return [found.setting.describe(layers), f"{found.estimate.total / GIB:.1f}", prev,
            " ".join(found.setting.overrides())]


def fine_tune_table(args) -> None:
    """The README table: 4.5B at 480p (480 x 832, a multiple of 16 px like MAGI-1's sizes), a 96-frame clip (4 chunks
    of 24 frames), one 24 GiB and one 80 GiB GPU, LoRA and full fine-tuning."""
    cfg = load_model_preset(args.model)
    chunk = clip_tokens(cfg, args.height or 480, args.width or 832)
    chunks = args.chunks or 4
    attention = args.attention or BACKEND_FAMILY.get(args.attention_backend or "flash", "flash")
    mb = MicroBatch(chunk * chunks, args.micro_batch_size, chunk, args.caption_length, args.caption_tokens, attention,
                    args.attention_backend or "flash")
    lora = Tuning(args.lora_rank or 16, tuple(args.lora_targets or DEFAULT_LORA_TARGETS), args.lora_dropout,
                  args.base_dtype)
    print(f"{args.model}, {args.height or 480}x{args.width or 832}, {chunks} chunks ({chunks * cfg.chunk_width * 4} "
          f"frames, {chunk * chunks} tokens), micro-batch {args.micro_batch_size}, trainer.precision=bf16, "
          f"model.attention_backend={mb.attention_backend}; planned with {USABLE:.0%} of each GPU\n")
    print("| run | GPU | cheapest setting that fits | GiB | next cheaper setting (does not fit) |")
    print("|---|---|---|---:|---|")
    rows = [(f"LoRA rank {lora.lora_rank}", lora, False, (24, 80)),
            (f"LoRA rank {lora.lora_rank}, fp8 base (planner only: not in the trainer yet)", lora, True, (24,)),
            ("full fine-tune", Tuning(), False, (24, 80))]
    for name, tuning, fp8, gpus in rows:
        for gpu in gpus:
            row = fit_rows(cfg, tuning, mb, gpu * USABLE, Layout(), fp8)
            if row is None:
                # What the last setting of the search (1 chunk, micro-batch 1, full recompute) would need.
                least = estimate(cfg, Layout(recompute="full"), replace(mb, seq_length=chunk, micro_batch_size=1),
                                 tuning=replace(tuning, base_dtype="float8") if fp8 else tuning)
                print(f"| {name} | 1 x {gpu} GiB | none (the least, 1 chunk with full recompute, needs "
                      f"{least.total / GIB:.1f} GiB) | - | - |")
            else:
                print(f"| {name} | 1 x {gpu} GiB | {row[0]} | {row[1]} | {row[2]} |")
    # Full fine-tuning over data parallel GPUs: ZeRO-2 shards gradients' owners and optimizer state.
    for dp in (2, 4, 8):
        row = fit_rows(cfg, Tuning(), mb, 80 * USABLE, Layout(dp=dp), False)
        if row is not None:
            print(f"| full fine-tune | {dp} x 80 GiB (dp={dp}, ZeRO-2) | {row[0]} | {row[1]} | {row[2]} |")
            break


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
    parser.add_argument("--recompute-layers", type=int, default=0,
                        help="trainer.recompute_layers: recompute the first N layers of a stage (0 = all)")
    parser.add_argument("--height", type=int, help="clip height in pixels (with --width and --chunks, instead of "
                                                   "--seq-length / --chunk-tokens)")
    parser.add_argument("--width", type=int, help="clip width in pixels")
    parser.add_argument("--chunks", type=int, help="chunks per clip (data.chunks_per_sample; 24 frames each)")
    parser.add_argument("--lora-rank", type=int, default=0, help="lora.rank: plan a LoRA run (0: full training)")
    parser.add_argument("--lora-targets", nargs="+", help="lora.targets patterns (default: the schema's)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="lora.dropout")
    parser.add_argument("--base-dtype", choices=BASE_DTYPES, default="auto",
                        help="lora.base_dtype of the frozen base (float8: planner only, not in the trainer yet)")
    parser.add_argument("--freeze", nargs="+", default=[], metavar="PATTERN",
                        help="full fine-tune: fnmatch patterns of parameters kept frozen")
    parser.add_argument("--fit", type=float, metavar="GIB",
                        help="search the cheapest setting of this layout that fits GIB per GPU (recompute, "
                             "micro-batch, frozen-base dtype, chunks, LoRA rank)")
    parser.add_argument("--fp8-base", action="store_true", help="--fit may also try a float8 frozen base")
    parser.add_argument("--fine-tune-table", action="store_true",
                        help="print the README's fine-tuning table (4.5B at 480p, one 24 / 80 GiB GPU) and exit")
    parser.add_argument("--gpu-memory", type=float, help="GiB per GPU: search the smallest layout that fits")
    parser.add_argument("--gpus", type=int, help="GPUs of the job (with --gpu-memory)")
    args = parser.parse_args()
    if args.fine_tune_table:
        if args.model == "magi1_24b" and "--model" not in sys.argv:
            args.model = "magi1_4.5b"
        fine_tune_table(args)
        return

    try:
        cfg = load_model_preset(args.model)
    except ConfigError as e:
        parser.error(str(e))
    chunk = args.chunk_tokens or cfg.chunk_width // cfg.t_patch_size * (720 // 8 // cfg.patch_size) * (1280 // 8 // cfg.patch_size)
    seq_length = args.seq_length
    if args.height or args.width or args.chunks:
        if not (args.height and args.width and args.chunks):
            parser.error("--height, --width and --chunks go together")
        try:
            chunk = clip_tokens(cfg, args.height, args.width)
        except ValueError as e:
            parser.error(str(e))
        seq_length = chunk * args.chunks
    attention = args.attention or BACKEND_FAMILY.get(args.attention_backend, "flash")
    try:
        mb = MicroBatch(seq_length, args.micro_batch_size, min(chunk, seq_length), args.caption_length,
                        args.caption_tokens, attention, args.attention_backend)
        tuning = Tuning(args.lora_rank, tuple(args.lora_targets or DEFAULT_LORA_TARGETS), args.lora_dropout,
                        args.base_dtype, tuple(args.freeze))
        params = ModelParams.of(cfg, tuning)
    except ValueError as e:
        parser.error(str(e))
    shown = with_defaults(mb, cfg)
    print(f"{args.model}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, params {cfg.params_dtype}, "
          f"{tuning.describe()}; "
          f"micro-batch {mb.micro_batch_size} x {mb.seq_length} tokens (chunks of {shown.chunk_tokens}), "
          f"captions {shown.caption_tokens}/{shown.caption_length} tokens, {mb.attention} attention "
          f"(model.attention_backend={mb.attention_backend})")
    layout = Layout(args.tp, args.cp, args.pp, args.dp, args.sequence_parallel, args.recompute, args.precision,
                    args.recompute_layers)
    print_table(layout.describe(), estimate(cfg, layout, mb, params))

    if args.fit is not None:
        from magi_train.observability.memory_plan_fit import fit

        found = fit(cfg, int(args.fit * GIB), mb, tuning, layout, fp8_base=args.fp8_base)
        if found is None:
            print(f"\nNo setting of {layout.describe()} fits {args.fit:g} GiB per GPU (down to one chunk, full "
                  f"recompute, micro-batch 1); try more GPUs (--gpu-memory / --gpus).")
            sys.exit(1)
        layers = cfg.num_layers // layout.pp
        print_table(f"Cheapest setting that fits {args.fit:g} GiB: {found.setting.describe(layers)}\n"
                    f"    {' '.join(found.setting.overrides())}", found.estimate)
        if found.previous is not None:
            print(f"The next cheaper setting, {found.previous[0].describe(layers)}, needs "
                  f"{found.previous[1].total / GIB:.2f} GiB.")

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
