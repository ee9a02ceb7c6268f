#!/usr/bin/env python
"""Distilled vs undistilled few-step sampling, both measured against the teacher's 64-step samples.

    python tools/distill_report.py --teacher runs/tiny/checkpoints --student runs/distill_tiny/checkpoints \
        [--steps 8] [--samples 8] [--weights ema|student] [--json OUT.json]

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
from magi_train.training.evaluation.distill_report import compare  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="base-model checkpoint (or a run's checkpoint root)")
    ap.add_argument("--student", required=True, help="distillation checkpoint (or a run's checkpoint root)")
    ap.add_argument("--steps", type=int, default=8, help="few-step sampler steps for both (default 8)")
    ap.add_argument("--samples", type=int, default=8, help="held-out captions x noise seeds (default 8)")
    ap.add_argument("--weights", choices=("ema", "student"), default="ema", help="student weights to sample")
    ap.add_argument("--nearly-clean-weight", type=float, default=0.7,
                    help="distilled sampler's with-context blend of the oldest chunk (released 0.7; 1 = no blend)")
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
    report = compare(teacher, student, cfg.model, cfg.data, steps=args.steps, samples=args.samples, seed=args.seed,
                     nearly_clean_weight=args.nearly_clean_weight,
                     guidance=(x.cfg_t_range, x.prev_chunk_scales, x.text_scales))
    print(f"teacher {args.teacher}; student {student_ckpt} ({args.weights} weights, step "
          f"{read_trainer_state(student_ckpt)['step']})")
    print("\n".join(report.lines()))
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": report.steps, "samples": report.samples,
                                               "base_error": report.base_error,
                                               "student_error": report.student_error,
                                               "per_sample": report.per_sample}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
