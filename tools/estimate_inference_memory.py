"""Print the memory one generation needs for each released MAGI-1 variant (or one preset), computed from
the presets: DiT weights, KV cache, peak activations of one DiT call, T5 (fp32) and VAE (bf16).

The KV cache holds the chunks of the attention window only (magi_train/diffusion/kv_cache.py `cache_window`), so
it stops growing once the video is longer than the window; "KV chunks" says how many of the video's chunks.
With kv_offload the call's keys are a copy on the GPU (window read + its own), counted in that column's total.

    python tools/estimate_inference_memory.py                       # the six released variants, 96 frames
    python tools/estimate_inference_memory.py --model magi1_24b --height 720 --width 1280 --frames 192

Each preset is composed as `magi_infer/generate.py model=<name>` composes it: the model preset and its
released run-time settings (conf/variant/<name>.yaml: video size, fp8).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from magi_infer.config import GenerateConfig, register_generate_config, to_generate_config
from magi_infer.memory import estimate, kv_window
from magi_train.config import ConfigError, compose, model_preset_names

VARIANTS = ["magi1_4.5b", "magi1_4.5b_distill", "magi1_4.5b_distill_fp8", "magi1_24b", "magi1_24b_distill",
            "magi1_24b_distill_fp8"]


def preset(name: str) -> GenerateConfig:
    """The validated generate config of `model=<name>` (model preset + conf/variant/<name>.yaml)."""
    if name not in model_preset_names():
        raise ConfigError(f"model={name!r}: no such preset in conf/model (available: {', '.join(model_preset_names())})")
    register_generate_config()
    return to_generate_config(compose("generate", [f"model={name}"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="preset name (repeatable); default: the six released")
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--window", type=int, default=4)
    args = parser.parse_args()
    gib = 2**30
    print("| preset | video | DiT weights | KV chunks | KV cache | activations | GPU total (KV on GPU) | "
          "GPU total (kv_offload) | T5 fp32 | VAE bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.model or VARIANTS:
        try:
            cfg = preset(name)
        except ConfigError as e:
            print(f"estimate_inference_memory.py: error: {e}", file=sys.stderr)
            sys.exit(2)
        h = args.height or cfg.video.height
        w = args.width or cfg.video.width
        s = cfg.sampler
        if s.num_steps % args.window:
            print(f"estimate_inference_memory.py: error: --window {args.window} does not divide the preset's "
                  f"sampler.num_steps={s.num_steps}", file=sys.stderr)
            sys.exit(2)
        on_gpu, offloaded = (dataclasses.replace(s, window_size=args.window, kv_cache=True, kv_offload=off)
                             for off in (False, True))
        e = estimate(cfg.model, h, w, args.frames, args.window, s.fp8, sampler=on_gpu)
        e_off = estimate(cfg.model, h, w, args.frames, args.window, s.fp8, sampler=offloaded)
        chunks = -(-(-(-args.frames // 4)) // cfg.model.chunk_width)
        cached = kv_window(cfg.model, on_gpu, chunks).capacity
        gpu = e.weights + e.activations + e.vae
        gpu_off = e_off.weights + e_off.activations + e_off.vae
        print(f"| {name} | {w}x{h}, {args.frames} frames | {e.weights / gib:.1f} | {cached} of {chunks} | "
              f"{e.kv_cache / gib:.1f} | {e.activations / gib:.1f} | {(gpu + e.kv_cache) / gib:.1f} | "
              f"{gpu_off / gib:.1f} | {e.t5 / gib:.1f} | {e.vae / gib:.1f} |")


if __name__ == "__main__":
    main()
