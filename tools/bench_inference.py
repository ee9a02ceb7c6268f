"""Per-chunk latency and KV-cache size of the sampler on the tiny model (CPU, fp32) for 2, 8 and 32 chunks.

    python tools/bench_inference.py                 # released lookbacks, 8 steps per chunk, window 4
    python tools/bench_inference.py --chunks 2 8 32 128 --threads 2 --no-cache

Prints, per video length: seconds per generated chunk (wall clock of the whole generation / chunks, after one
warm-up generation), the KV cache's bytes, the most tokens one call reads from it, the most tokens fed to the model
in one call. With the cache bounded by the attention window all but the first figure stay flat as the video
grows, and so does the latency per chunk (`--no-cache`: the cache-free oracle, which recomputes the lookback).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from magi_train.config.schema import ModelConfig, SamplerConfig
from magi_train.diffusion.sampler import Captions, StaircaseSampler
from magi_train.model.dit import build_dit


def tiny(distill: bool) -> torch.nn.Module:
    cfg = ModelConfig(num_layers=2, hidden_size=256, ffn_hidden_size=256, num_attention_heads=2, num_query_groups=1,
                      kv_channels=128, caption_channels=32, caption_max_length=60, distill=distill,
                      params_dtype="float32")
    torch.manual_seed(0)
    model = build_dit(cfg)
    with torch.no_grad():  # the zero-initialised output layer would make every velocity 0
        model.final_linear.linear.weight.normal_(0, 0.05)
    return model.eval()


def generate(model, sampler_cfg: SamplerConfig, n: int, size: int):
    g = torch.Generator().manual_seed(0)
    cfg = model.cfg
    noise = torch.randn(1, cfg.in_channels, cfg.chunk_width * n, size, size, generator=g)
    y = torch.randn(2, n, cfg.caption_max_length, cfg.caption_channels, generator=g)
    mask = torch.ones(2, n, cfg.caption_max_length)
    sampler = StaircaseSampler(model, sampler_cfg)
    start = time.perf_counter()
    for _ in sampler.sample(noise, Captions(y, mask)):
        pass
    return time.perf_counter() - start, sampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=8, help="latent height = width")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cfg3", action="store_true", help="three-pass guidance (default: distilled, one pass)")
    parser.add_argument("--no-cache", action="store_true", help="the cache-free oracle (sampler.kv_cache=false)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    distill = not args.cfg3
    model = tiny(distill)
    s = dataclasses.replace(SamplerConfig(), num_steps=args.steps, window_size=4, cfg_number=1 if distill else 3,
                            kv_cache=not args.no_cache)
    generate(model, s, 2, args.size)  # warm-up
    print(f"tiny DiT ({'distill, cfg 1' if distill else 'cfg 3'}), {args.steps} steps/chunk, window 4, "
          f"latent {args.size}x{args.size}, kv_cache={s.kv_cache}, {args.threads} thread(s)")
    print("| chunks | s / chunk | KV cache bytes | max tokens read / call | max tokens fed / call |")
    print("|---|---|---|---|---|")
    for n in args.chunks:
        seconds, sampler = generate(model, s, n, args.size)
        cache = sampler._cache
        read = max(cache.read_tokens) if cache is not None and cache.read_tokens else 0
        print(f"| {n} | {seconds / n:.4f} | {0 if cache is None else cache.nbytes()} | {read} | "
              f"{max(sampler.fed_tokens)} |", flush=True)


if __name__ == "__main__":
    main()
