#!/usr/bin/env python
"""Train a tiny ViT VAE (the released architecture, small) on synthetic shape clips and write a diffusers-style
directory that `ViTVAE.from_pretrained`, `tools/prepare_dataset.py --vae DIR` and `vae.dir=DIR` load.

    python tools/train_vae.py --out data/tiny_vae [--steps 1500] [--batch-size 4] [--lr 1e-3] [--seed 0] \
        [--eval-seed 1] [--sizes 128x128,160x96] [--embed-dim 192] [--depth 2] [--heads 4] \
        [--kl-weight 1e-4] [--edge-weight 0.5] [--weights-dtype bfloat16] [--threads 2]

The clips are drawn in memory from --seed (magi_train/data/synthetic_video.py, the clips
tools/make_synthetic_dataset.py writes); the held-out PSNR is measured on --eval-seed clips of 24 frames at
128x128 (and each other training size) through the codec. The latent is normalised in the weights so that the
released scale factor 0.18215 (the default everywhere) gives std 1. OUT/train_vae.json records the command,
the settings, the losses, the PSNR and the latent statistics. The training is magi_train/training/vae_training.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a script, Python puts tools/ first on sys.path; the installed packages are what we import.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
try:
    import magi_train  # noqa: F401  (installed editable in the venv)
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magi_train.training.vae_training import VaeTrainConfig, run  # noqa: E402

DEFAULTS = VaeTrainConfig()


def parse_size(text: str) -> tuple:
    try:
        width, height = (int(v) for v in text.strip().lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT (e.g. 128x128)") from None
    return width, height


def parse_sizes(text: str) -> tuple:
    return tuple(parse_size(part) for part in text.split(","))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output VAE directory (replaced atomically)")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps)
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    p.add_argument("--lr", type=float, default=DEFAULTS.lr)
    p.add_argument("--min-lr", type=float, default=DEFAULTS.min_lr)
    p.add_argument("--warmup", type=int, default=DEFAULTS.warmup)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="training clips and initial weights")
    p.add_argument("--eval-seed", type=int, default=DEFAULTS.eval_seed, help="held-out clips (not --seed)")
    p.add_argument("--sizes", type=parse_sizes, default=DEFAULTS.sizes,
                   help="training WIDTHxHEIGHT list, one per step in turn; the first (square) sets the VAE's "
                        "reference grid (default 128x128,160x96)")
    p.add_argument("--frames", type=int, default=DEFAULTS.frames, help="frames per training clip (multiple of 4)")
    p.add_argument("--fps", type=int, default=DEFAULTS.fps)
    p.add_argument("--embed-dim", type=int, default=DEFAULTS.embed_dim)
    p.add_argument("--depth", type=int, default=DEFAULTS.depth)
    p.add_argument("--heads", type=int, default=DEFAULTS.num_heads)
    p.add_argument("--mlp-ratio", type=float, default=DEFAULTS.mlp_ratio)
    p.add_argument("--kl-weight", type=float, default=DEFAULTS.kl_weight)
    p.add_argument("--edge-weight", type=float, default=DEFAULTS.edge_weight)
    p.add_argument("--shape-weight", type=float, default=DEFAULTS.shape_weight,
                   help="extra L1/MSE weight on the shapes' pixels (1 + this there); 0: every pixel alike")
    p.add_argument("--eval-clips", type=int, default=DEFAULTS.eval_clips)
    p.add_argument("--eval-size", type=parse_size, default=DEFAULTS.eval_size)
    p.add_argument("--stats-clips", type=int, default=DEFAULTS.stats_clips)
    p.add_argument("--weights-dtype", default=DEFAULTS.weights_dtype, choices=["bfloat16", "float32"])
    p.add_argument("--log-every", type=int, default=DEFAULTS.log_every)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (results depend on it)")
    args = p.parse_args(argv)
    cfg = VaeTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                         warmup=args.warmup, seed=args.seed, eval_seed=args.eval_seed, sizes=args.sizes,
                         frames=args.frames, fps=args.fps, embed_dim=args.embed_dim, depth=args.depth,
                         num_heads=args.heads, mlp_ratio=args.mlp_ratio, kl_weight=args.kl_weight,
                         edge_weight=args.edge_weight, shape_weight=args.shape_weight, eval_clips=args.eval_clips,
                         eval_size=args.eval_size,
                         stats_clips=args.stats_clips, weights_dtype=args.weights_dtype, log_every=args.log_every)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads={args.threads}: must be a positive integer")
    try:
        cfg.validate()
        cfg.ddconfig()
    except ValueError as e:
        p.error(str(e))
    command = ["python", "tools/train_vae.py", *(sys.argv[1:] if argv is None else argv)]
    record = run(cfg, args.out, command, threads=args.threads)
    print(f"wrote {args.out}: held-out PSNR {record['psnr_db']:.2f} dB, latent std {record['latent']['std']:.3f} "
          f"at scale factor {record['recommended_scale_factor']}, {record['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
