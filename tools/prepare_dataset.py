#!/usr/bin/env python
r"""Turn captioned videos and images into training shards: VAE latents + text-encoder features (data/README.md).

    python tools/prepare_dataset.py --input data/clips.jsonl --out data/shards --vae downloads/vae \
        --text-encoder t5:downloads/t5_pretrained --buckets 720x1280,1280x720,960x960 --workers 4 --device cuda

--input is a folder (every .mp4/.mov/.mkv/.webm/.png/.jpg/.jpeg/.webp, captioned by a <name>.json or <name>.txt
sidecar), a CSV (header path,caption[,captions]) or a JSONL list ({"path", "caption" and/or "captions"}); paths are
relative to the list. Clips are resampled to --fps, resized (shorter side) and centre-cropped to the bucket nearest
in aspect ratio, cut to whole --chunk-frames chunks and capped at --max-seconds; images become one-frame samples.
Shards are named shard-NNNNNN.tar; manifest.jsonl records the inputs of each completed shard, so --resume
continues an interrupted run. Bad inputs are skipped and listed in the summary with the reason.

Exit status: 0 when the output holds samples, 1 when nothing could be written, 2 for unusable settings or lists.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

try:
    import magi_train  # noqa: F401  (installed editable in the venv)
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magi_train.data.prepare import DEFAULT_BUCKETS, InputListError, PrepareConfig, PrepareError, run_prepare

DEFAULTS = PrepareConfig(Path(), Path(), Path(), "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="folder, .csv or .jsonl list")
    parser.add_argument("--out", type=Path, required=True, help="shard folder (created)")
    parser.add_argument("--vae", type=Path, required=True, help="diffusers-style ViT VAE folder")
    parser.add_argument("--text-encoder", required=True,
                        help="t5:DIR (a t5-v1_1-xxl folder), hash:DIM or hash_bigram:DIM (synthetic captions)")
    parser.add_argument("--buckets", default=",".join(DEFAULT_BUCKETS),
                        help="HEIGHTxWIDTH resolutions, comma-separated (default %(default)s)")
    parser.add_argument("--fps", type=int, default=DEFAULTS.fps)
    parser.add_argument("--max-seconds", type=float, default=None, help="keep at most this much of each clip")
    parser.add_argument("--samples-per-shard", type=int, default=DEFAULTS.samples_per_shard)
    parser.add_argument("--workers", type=int, default=DEFAULTS.workers,
                        help="encoding processes, each with its own models (0: encode in this process)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                        help="clips per task; their captions are text-encoded together")
    parser.add_argument("--device", default=DEFAULTS.device, help="cpu, cuda (workers spread over GPUs) or cuda:N")
    parser.add_argument("--resume", action="store_true", help="continue the dataset already in --out")
    parser.add_argument("--text-length", type=int, default=DEFAULTS.text_length,
                        help="tokens per caption before trimming to the longest (T5: 800 as released)")
    parser.add_argument("--chunk-frames", type=int, default=DEFAULTS.chunk_frames,
                        help="pixel frames per chunk (model.chunk_width x VAE patch_length)")
    parser.add_argument("--size-multiple", type=int, default=DEFAULTS.size_multiple,
                        help="bucket sides must be multiples of this (VAE patch x DiT patch)")
    parser.add_argument("--vae-tile-px", type=int, default=DEFAULTS.vae_tile_px)
    parser.add_argument("--vae-overlap", type=float, default=DEFAULTS.vae_overlap)
    parser.add_argument("--vae-dtype", default=DEFAULTS.vae_dtype, choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = PrepareConfig(
        input=args.input, out=args.out, vae=args.vae, text_encoder=args.text_encoder,
        buckets=tuple(b for b in args.buckets.split(",") if b.strip()), fps=args.fps, max_seconds=args.max_seconds,
        samples_per_shard=args.samples_per_shard, workers=args.workers, batch_size=args.batch_size,
        device=args.device, resume=args.resume, text_length=args.text_length, chunk_frames=args.chunk_frames,
        size_multiple=args.size_multiple, vae_tile_px=args.vae_tile_px, vae_overlap=args.vae_overlap,
        vae_dtype=args.vae_dtype, progress=not args.no_progress,
    )
    try:
        summary = run_prepare(cfg)
    except (InputListError, PrepareError) as e:
        print(f"prepare_dataset: error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
