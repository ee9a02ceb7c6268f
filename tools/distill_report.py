#!/usr/bin/env python
"""Distilled vs undistilled few-step sampling, both measured against the teacher's 64-step samples.

    python tools/distill_report.py --teacher runs/tiny/checkpoints --student runs/distill_tiny/checkpoints \
        [--steps 8 [4 ...]] [--samples 8] [--weights ema|student] [--json OUT.json]

The teacher is a base-model checkpoint of this trainer, the student a distillation checkpoint
(experiment=distill_tiny); model and data settings come from the student's saved config. Held-out captions
of the synthetic dataset (magi_train/training/evaluation/distill_report.py says what is generated and compared).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

# Run as a script, Python puts tools/ first on sys.path; the installed packages are what we import.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from magi_train.checkpoint.weights import load_weights  # noqa: E402
from magi_train.checkpoint.distributed import checkpoint_has, read_full_weights, read_trainer_state  # noqa: E402
from magi_train.checkpoint.manager import find_checkpoint  # noqa: E402
from magi_train.config import to_train_config  # noqa: E402
from magi_train.training.evaluation.distill_report import compare_steps  # noqa: E402


def shards_text_encoder(shards: str):
    """The text-encoder kind ("hash", "t5", ...) that tools/prepare_dataset.py recorded in SHARDS/prepare.json,
    or None when there is none to read."""
    try:
        spec = json.loads((Path(shards) / "prepare.json").read_text())["text_encoder"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return str(spec).partition(":")[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="base-model checkpoint (or a run's checkpoint root)")
    ap.add_argument("--student", required=True, help="distillation checkpoint (or a run's checkpoint root)")
    ap.add_argument("--steps", type=int, nargs="+", default=[8],
                    help="few-step sampler steps for both, one report per count (default 8)")
    ap.add_argument("--samples", type=int, default=8, help="held-out captions x noise seeds (default 8)")
    ap.add_argument("--weights", choices=("ema", "student"), default="ema", help="student weights to sample")
    ap.add_argument("--nearly-clean-weight", type=float, default=0.7,
                    help="distilled sampler's with-context blend of the oldest chunk (released 0.7; 1 = no blend)")
    ap.add_argument("--size", default="128x128",
                    help="students trained on webdataset shards (experiment=distill_demo): the video size WxH of "
                         "the held-out prompt-following cases they generate, through a ViT VAE of spatial patch 8 "
                         "(default 128x128 = 16x16 latents, as make demo)")
    ap.add_argument("--text-encoder", choices=("hash", "hash_bigram"),
                    help="webdataset students: the encoder of those captions (default: the one data.shards/"
                         "prepare.json of the student's config records)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args(argv)

    student_ckpt = find_checkpoint(args.student)
    if student_ckpt is None:
        ap.error(f"--student {args.student}: no complete checkpoint there")
    cfg = to_train_config(read_trainer_state(student_ckpt)["config"])
    if not cfg.distill.enabled:
        ap.error(f"--student {student_ckpt} is not a distillation checkpoint (its config has distill.enabled=false)")
    prefix = "ema" if args.weights == "ema" else "model"
    if not checkpoint_has(student_ckpt, prefix):
        ap.error(f"--student {student_ckpt} holds no {prefix!r} weights")
    student = read_full_weights(student_ckpt, prefix)
    teacher, _ = load_weights(args.teacher, replace(cfg.model, distill=False), fp8=False)
    x = cfg.distill
    bad = [k for k in args.steps if k < 1 or 64 % k]
    if bad:
        ap.error(f"--steps {bad}: each must divide 64 (a distilled step is a power-of-two multiple of 1/64)")
    held_out, latent_hw = None, None
    if cfg.data.kind.value == "webdataset":
        # No built-in caption source: the held-out cases of tools/eval_prompt_following.py (2 chunks each).
        from magi_train.training.evaluation.distill_report import hashed_held_out
        from magi_train.training.evaluation.prompt_following import held_out_cases

        try:
            width, height = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            ap.error(f"--size {args.size!r}: expected WxH, e.g. 128x128")
        if width % 8 or height % 8:
            ap.error(f"--size {args.size}: both sides must be multiples of 8 (the VAE's spatial patch)")
        encoder = args.text_encoder or shards_text_encoder(cfg.data.shards)
        if encoder is None:
            ap.error(f"the student's data.shards ({cfg.data.shards}) has no readable prepare.json naming its text "
                     "encoder: give --text-encoder hash or hash_bigram")
        if encoder not in ("hash", "hash_bigram"):
            ap.error(f"the student was trained on {encoder} captions: this report embeds its held-out captions "
                     "with the hash encoders only (hash, hash_bigram)")
        cases = held_out_cases(args.samples, seed=args.seed, width=width, height=height, colour_fraction=0.5)
        held_out = hashed_held_out(cfg.model, [c.captions for c in cases], bigrams=encoder == "hash_bigram")
        latent_hw = (height // 8, width // 8)
    reports = compare_steps(teacher, student, cfg.model, cfg.data, steps=args.steps, samples=args.samples,
                            seed=args.seed, nearly_clean_weight=args.nearly_clean_weight,
                            guidance=(x.cfg_t_range, x.prev_chunk_scales, x.text_scales),
                            held_out=held_out, latent_hw=latent_hw)
    print(f"teacher {args.teacher}; student {student_ckpt} ({args.weights} weights, step "
          f"{read_trainer_state(student_ckpt)['step']})")
    for report in reports:
        print("\n".join(report.lines()))
    if args.json:
        # One step count: the report itself (as before); several: {"reports": [...]}.
        rows = [{"steps": r.steps, "samples": r.samples, "base_error": r.base_error,
                 "student_error": r.student_error, "per_sample": r.per_sample} for r in reports]
        Path(args.json).write_text(json.dumps(rows[0] if len(rows) == 1 else {"reports": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
