#!/usr/bin/env python
r"""Does a model follow its chunk-wise prompts? Held-out synthetic-shape captions, generated and scored.

    python tools/eval_prompt_following.py --model runs/tiny/checkpoints --vae runs/vae --steps 64 [--cases 20]

    python tools/eval_prompt_following.py --vae runs/vae --cases 20 --json scores.json \
        --run base@64:runs/tiny/checkpoints:64 --run base@8:runs/tiny/checkpoints:8 \
        --run distilled@8:runs/distill_tiny/checkpoints:8 --run distilled@4:runs/distill_tiny/checkpoints:4

Each case is a list of per-chunk captions worded as tools/make_synthetic_dataset.py words them (one shape:
colour, shape, direction, location), drawn from a random stream the dataset never uses; half of them (by
default) change direction between chunks (`--colour-fraction` of those change colour instead, which only a model
trained on `colour_change` clips can follow). Every run generates every case through MagiPipeline with the
same noise (seed `--seed` + case index), decodes it to pixels and scores it with an analytic detector (colour
segmentation, centroid tracks): colour accuracy and direction accuracy per chunk, and switch accuracy over the
chunks from the first change on (magi_train/training/evaluation/prompt_following.py says exactly what).

`--model` / `--run` take anything MagiPipeline.from_pretrained takes: a checkpoint of our trainer (a run's
checkpoint root or one checkpoint) or a released model directory. The detector needs pixels: a model whose
decoder is the latent-colour preview (the tiny preset's default) needs `--vae DIR`, a ViT VAE directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Tuple

# Run as a script, Python puts tools/ first on sys.path; the installed packages are what we import.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from magi_train.training.evaluation.prompt_following import evaluate, held_out_cases, table  # noqa: E402

Run = Tuple[str, str, Optional[int]]  # label, model path, sampler steps (None: the model's default)


def parse_run(text: str) -> Run:
    """"LABEL:MODEL_DIR:STEPS" (STEPS may be empty: the model's default) -> (label, dir, steps)."""
    label, sep, rest = text.partition(":")
    model, sep2, steps = rest.rpartition(":")
    if not (sep and sep2) or not label or not model:
        raise ValueError(f"--run {text!r} is not LABEL:MODEL_DIR:STEPS (e.g. base@64:runs/tiny/checkpoints:64)")
    if steps == "":
        return label, model, None
    try:
        value = int(steps)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"--run {text!r}: STEPS {steps!r} must be a whole number >= 1 (or empty: the model's)")
    return label, model, value


def parse_size(text: str) -> Tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {text!r} is not WIDTHxHEIGHT (e.g. 128x128)") from None
    if width < 8 or height < 8:
        raise ValueError(f"--size {text!r}: width and height must be >= 8")
    return width, height


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="one model to evaluate (a checkpoint or released model directory)")
    ap.add_argument("--steps", type=int, help="sampler steps for --model (default: the model's)")
    ap.add_argument("--run", action="append", default=[], metavar="LABEL:MODEL_DIR:STEPS",
                    help="a configuration to evaluate; repeat it for a table (STEPS may be empty)")
    ap.add_argument("--vae", help="ViT VAE directory (config.json + safetensors) to decode with")
    ap.add_argument("--t5", help="T5 directory, for models whose text encoder is T5")
    ap.add_argument("--preset", help="model preset (conf/model), default: inferred from the weights")
    ap.add_argument("--cases", type=int, default=20, help="held-out cases (default 20)")
    ap.add_argument("--frames", type=int, default=48,
                    help="frames per video (default 48: two 24-frame chunks, one caption each)")
    ap.add_argument("--size", help="WIDTHxHEIGHT of the videos (default: the first model's video size)")
    ap.add_argument("--change-fraction", type=float, default=0.5, help="share of cases that change (default 0.5)")
    ap.add_argument("--colour-fraction", type=float, default=0.0,
                    help="share of the changing cases that change colour rather than direction (default 0)")
    ap.add_argument("--seed", type=int, default=0, help="cases and noise: case i is generated with seed + i")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="a generate key (conf/generate.yaml) for every run, e.g. device=cpu")
    ap.add_argument("--videos", type=Path, help="also write each generated case to DIR/LABEL/seed_NNNN.mp4")
    ap.add_argument("--json", type=Path, help="also write the scores (and every chunk's detection) here")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    runs: List[Run] = []
    try:
        if args.model:
            # A run's folder is often just ".../checkpoints": the row says the steps, the JSON the model path.
            runs.append((f"model@{args.steps or 'default'}", args.model, args.steps))
        elif args.steps is not None:
            raise ValueError("--steps goes with --model; a --run gives its steps as LABEL:MODEL_DIR:STEPS")
        runs += [parse_run(r) for r in args.run]
        size = parse_size(args.size) if args.size else None
    except ValueError as e:
        ap.error(str(e))
    if not runs:
        ap.error("nothing to evaluate: give --model DIR or one or more --run LABEL:MODEL_DIR:STEPS")
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps {args.steps} must be >= 1")
    labels = [label for label, _, _ in runs]
    if len(set(labels)) != len(labels):
        ap.error(f"run labels repeat ({labels}): each row of the table needs its own")
    for label, model, _ in runs:
        if not Path(model).exists():
            ap.error(f"run {label!r}: model {model} does not exist")
    if args.vae and not Path(args.vae).is_dir():
        ap.error(f"--vae {args.vae} is not a directory")
    if args.cases < 1:
        ap.error(f"--cases {args.cases} must be >= 1")
    for name in ("change_fraction", "colour_fraction"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be in [0, 1]")

    # The app, imported only once the arguments are known to be good.
    from magi_infer import MagiPipeline
    from magi_infer.config import TEMPORAL
    from magi_infer.pipeline import resolve_config
    from magi_train.config.choices import VaeKind

    # Every run's config first (cheap: nothing is loaded), so that a bad run stops the tool before the first
    # run's generations rather than after them. Steps go in as sampler.num_steps: checked with the window here.
    base = ["progress=false", *args.override] + (["vae.kind=vit"] if args.vae else [])
    if size:
        base += [f"video.width={size[0]}", f"video.height={size[1]}"]
    configs = []
    for label, model, steps in runs:
        try:
            cfg = resolve_config(model, model=args.preset, vae_dir=args.vae, t5_dir=args.t5,
                                 overrides=base + ([f"sampler.num_steps={steps}"] if steps is not None else []))
        except (ValueError, OSError) as e:  # ConfigError is a ValueError
            ap.error(f"run {label!r} ({model}): {e}")
        if cfg.vae.kind == VaeKind.preview:
            ap.error(f"run {label!r}: {model} decodes with the latent-colour preview (vae.kind=preview), not to "
                     "pixels the detector can read; pass --vae DIR (a ViT VAE directory)")
        configs.append(cfg)
    # The cases are drawn at the size generated, so that their location phrases are the data's.
    sizes = {(c.video.width, c.video.height) for c in configs}
    if len(sizes) > 1:
        ap.error(f"the runs generate different sizes {sorted(sizes)}; pass --size WIDTHxHEIGHT for all of them")
    size = sizes.pop()
    chunk_frames = {c.model.chunk_width * TEMPORAL for c in configs}  # output frames per chunk, as MagiPipeline
    if len(chunk_frames) > 1:
        ap.error(f"the runs' chunks differ in length {sorted(chunk_frames)} frames: their captions cannot be shared")
    try:
        cases = held_out_cases(args.cases, seed=args.seed, width=size[0], height=size[1], num_frames=args.frames,
                               fps=chunk_frames.pop(), change_fraction=args.change_fraction,
                               colour_fraction=args.colour_fraction)
    except ValueError as e:
        ap.error(str(e))

    reports = []
    for (label, model, _), cfg in zip(runs, configs):
        pipe = MagiPipeline(cfg)
        report = evaluate(pipeline_generator(pipe, args.videos and args.videos / label), cases, seed=args.seed,
                          label=label)
        report.extra.update(model=str(model), steps=cfg.sampler.num_steps)
        print("\n".join(report.lines()), flush=True)
        reports.append(report)
        del pipe  # one model in memory at a time
    print()
    print(f"{len(cases)} held-out cases at {size[0]}x{size[1]}, {args.frames} frames, seed {args.seed}:")
    print("\n".join(table(reports)))
    if args.json:
        args.json.write_text(json.dumps({"cases": len(cases), "size": list(size), "frames": args.frames,
                                         "seed": args.seed, "runs": [r.as_dict() for r in reports]}, indent=2))
    return 0


def pipeline_generator(pipe, videos: Optional[Path] = None):
    """The `generate(captions, num_frames, seed)` of prompt_following.evaluate for a MagiPipeline: chunk-wise
    prompts (one per chunk), its configured sampler steps, decoded uint8 frames; also written under `videos`."""
    def generate(captions: List[str], num_frames: int, seed: int):
        frames = pipe(captions, num_frames=num_frames, seed=seed, output_type="np").frames
        if videos is not None:
            from magi_train.data.synthetic_video import write_mp4

            videos.mkdir(parents=True, exist_ok=True)
            write_mp4(videos / f"seed_{seed:04d}.mp4", frames, pipe.config.video.fps)
        return frames

    return generate


if __name__ == "__main__":
    sys.exit(main())
