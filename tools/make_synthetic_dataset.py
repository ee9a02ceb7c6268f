#!/usr/bin/env python
r"""Write a small dataset of real videos and stills for trying out (and testing) tools/prepare_dataset.py.

    python tools/make_synthetic_dataset.py --out data/synthetic --num-videos 10 --num-images 2 \
        --seconds 1-3 --size 64x48,48x64,64x64 --seed 0

Videos are H.264 mp4s (yuv420p) of coloured circles, squares and triangles moving over a plain or gradient
background; stills are PNGs. `OUT/captions.jsonl` lists them, one JSON object a line: `path` (relative to OUT),
`captions` (one per second: the MAGI-1 "AR captions", e.g. "a red circle moves right in the top left") and
`caption` (the whole clip). `--sidecars` also writes `<name>.json` next to each file, for folder input.
The output is a pure function of the arguments.
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

from magi_train.data.synthetic_video import make_dataset, parse_seconds, parse_sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--num-videos", type=int, default=10)
    parser.add_argument("--num-images", type=int, default=2)
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument("--seconds", default="1-3", help="duration, or a range to draw from (e.g. 1-3)")
    parser.add_argument("--size", default="64x48,48x64,64x64",
                        help="WIDTHxHEIGHT, or several separated by commas (clip i takes size i mod count)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sidecars", action="store_true", help="also write <name>.json caption files")
    parser.add_argument("--colour-change", type=float, default=0.0,
                        help="probability that a shape turns a new colour at each new second ('the red circle "
                             "turns blue and ...'); 0 (default): never, the clips are as without the option")
    parser.add_argument("--max-shapes", type=int, choices=(1, 2), default=2,
                        help="shapes per video at most; 1 drops the second shape of the two-shape clips (the "
                             "held-out cases of tools/eval_prompt_following.py have one shape)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        seconds, sizes = parse_seconds(args.seconds), parse_sizes(args.size)
    except ValueError as e:
        parser.error(str(e))
    if args.fps < 1:
        parser.error(f"--fps must be >= 1, got {args.fps}")
    if not 0.0 <= args.colour_change <= 1.0:
        parser.error(f"--colour-change is a probability: it must be in [0, 1], got {args.colour_change}")
    entries = make_dataset(args.out, args.num_videos, args.num_images, args.fps, seconds, sizes, args.seed,
                           sidecars=args.sidecars, colour_change=args.colour_change,
                           max_shapes=args.max_shapes)
    print(f"wrote {args.num_videos} videos and {args.num_images} images to {args.out} "
          f"(list: {args.out / 'captions.jsonl'}, {len(entries)} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
