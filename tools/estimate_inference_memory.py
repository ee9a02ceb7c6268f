"""Print the memory one generation needs for each released MAGI-1 variant (or one preset), computed from
the presets: DiT weights, KV cache, peak activations of one DiT call, T5 (fp32) and VAE (bf16).

    python tools/estimate_inference_memory.py                       # the six released variants, 96 frames
    python tools/estimate_inference_memory.py --model magi1_24b --height 720 --width 1280 --frames 192
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from magi_infer.memory import estimate
from magi_train.observability.memory_plan import load_preset

CONF = Path(__file__).resolve().parents[1] / "conf"
VARIANTS = ["magi1_4.5b", "magi1_4.5b_distill", "magi1_4.5b_distill_fp8", "magi1_24b", "magi1_24b_distill",
            "magi1_24b_distill_fp8"]


def preset(name: str):
    """(ModelConfig of conf/model/<name>.yaml following its defaults, conf/variant/<name>.yaml settings)."""
    variant_path = CONF / "variant" / f"{name}.yaml"
    variant = OmegaConf.load(variant_path) if variant_path.exists() else OmegaConf.create()
    return OmegaConf.structured(load_preset(name)), variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="preset name (repeatable); default: the six released")
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--window", type=int, default=4)
    args = parser.parse_args()
    gib = 2**30
    print("| preset | video | DiT weights | KV cache | activations | GPU total (KV on GPU) | GPU total (kv_offload) "
          "| T5 fp32 | VAE bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.model or VARIANTS:
        model, variant = preset(name)
        model = OmegaConf.to_object(model)
        h = args.height or variant.get("video", {}).get("height", 720)
        w = args.width or variant.get("video", {}).get("width", 720)
        fp8 = bool(variant.get("sampler", {}).get("fp8", False))
        e = estimate(model, h, w, args.frames, args.window, fp8)
        gpu = e.weights + e.activations + e.vae
        print(f"| {name} | {w}x{h}, {args.frames} frames | {e.weights / gib:.1f} | {e.kv_cache / gib:.1f} | "
              f"{e.activations / gib:.1f} | {(gpu + e.kv_cache) / gib:.1f} | {gpu / gib:.1f} | {e.t5 / gib:.1f} | "
              f"{e.vae / gib:.1f} |")


if __name__ == "__main__":
    main()
