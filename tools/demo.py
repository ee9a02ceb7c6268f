#!/usr/bin/env python
r"""`make demo`: the whole chain on real pixels, on a CPU, in minutes.

    python tools/demo.py [--out runs/demo] [--vae data/tiny_vae] [--clips 320] [--steps N] [--cases 16]

1. tools/make_synthetic_dataset.py draws 2-second clips of a coloured shape moving over a plain or gradient
   background at 128x128 (one shape, as the held-out cases of step 5), each with one caption per second (per
   24-frame chunk), as H.264 mp4s.
2. tools/prepare_dataset.py encodes them into webdataset shards with the tiny ViT VAE shipped in data/tiny_vae
   (tools/train_vae.py made it) and the hash text encoder.
3. magi_train/train.py experiment=demo trains the tiny DiT on the shards (torchrun, one process).
4. magi_infer/generate.py writes a chunk-wise-prompted video decoded to pixels (OUT/demo.mp4) and this script a
   strip of its frames beside it (OUT/demo_strip.png).
5. tools/eval_prompt_following.py generates held-out captions with the trained model and scores the decoded
   videos: colour, direction and per-chunk switch accuracy, printed at the end (OUT/scores.json).

With --distill-steps N (not part of `make demo`: it adds minutes) the model is then distilled for N steps
(experiment=distill_demo), step 5 scores base@64, base@8, distilled@8 and distilled@4, and
tools/distill_report.py measures both few-step samplers against the base model's 64 guided steps
(OUT/distill_report.json).

Every step is the command a user would type; each is printed before it runs, with its wall time after.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == REPO / "tools":
    sys.path.pop(0)

# The demo video: one caption per 24-frame chunk. The object turns and changes colour between chunks, which
# the training clips show (make_synthetic_dataset --colour-change).
DEMO_PROMPT = ["a red circle moves right on the left, over a plain black background",
               "the red circle moves down in the center",
               "the red circle turns blue and moves left at the bottom"]
STRIP_FRAMES = 8  # frames in the strip PNG, evenly spaced over the video


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/demo"), help="everything goes here (replaced)")
    ap.add_argument("--vae", type=Path, default=REPO / "data" / "tiny_vae", help="ViT VAE directory")
    ap.add_argument("--clips", type=int, default=320, help="training clips")
    ap.add_argument("--seconds", default="2", help="clip duration in seconds, or a range (e.g. 2-3)")
    ap.add_argument("--colour-change", type=float, default=0.25,
                    help="probability that a shape changes colour at each new second of a clip")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the demo preset's)")
    ap.add_argument("--sample-steps", type=int, default=64, help="sampler steps per chunk")
    ap.add_argument("--cases", type=int, default=16, help="held-out prompt-following cases")
    ap.add_argument("--distill-steps", type=int, default=0,
                    help="also distil the trained model for this many steps and score it at 8 and 4 steps (0: no)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for every step")
    ap.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra Hydra override for the training step")
    return ap


def run(cmd: List[str], threads: int) -> float:
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": str(threads), "WANDB_SILENT": "true"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"demo: this step failed (exit {done.returncode}): {' '.join(cmd[:3])} ...")
    print(f"[{seconds:.1f} s]", flush=True)
    return seconds


def frame_strip(video: Path, png: Path, count: int = STRIP_FRAMES) -> None:
    """`count` evenly spaced frames of `video` side by side, 2 px apart, as a PNG."""
    import av
    import numpy as np

    from magi_train.data.synthetic_video import write_png

    with av.open(str(video)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    picks = [frames[round(i * (len(frames) - 1) / (count - 1))] for i in range(count)]
    height, width = picks[0].shape[:2]
    strip = np.full((height, count * width + (count - 1) * 2, 3), 255, np.uint8)
    for i, frame in enumerate(picks):
        strip[:, i * (width + 2):i * (width + 2) + width] = frame
    write_png(png, strip)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.vae / "config.json").is_file():
        raise SystemExit(f"demo: --vae {args.vae} has no config.json (a ViT VAE directory such as data/tiny_vae)")
    out = args.out if args.out.is_absolute() else REPO / args.out
    py, torchrun = sys.executable, str(Path(sys.executable).with_name("torchrun"))
    clips, shards, train_dir = out / "clips", out / "shards", out / "train"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    times = {}
    start = time.perf_counter()
    times["clips"] = run([py, "tools/make_synthetic_dataset.py", "--out", str(clips), "--num-videos",
                          str(args.clips), "--num-images", "0", "--seconds", args.seconds, "--size", "128x128",
                          "--colour-change", str(args.colour_change), "--max-shapes", "1", "--seed", "0"], args.threads)
    per_shard = min(64, max(1, args.clips // 2))  # at least the 2 shards the preset's 2 loader streams need
    times["shards"] = run([py, "tools/prepare_dataset.py", "--input", str(clips / "captions.jsonl"), "--out",
                           str(shards), "--vae", str(args.vae), "--text-encoder", "hash:64", "--buckets",
                           "128x128", "--samples-per-shard", str(per_shard), "--workers", "0", "--no-progress"],
                          args.threads)
    steps = [f"trainer.max_steps={args.steps}"] if args.steps else []
    times["train"] = run([torchrun, "--standalone", "--nproc_per_node", "1", "magi_train/train.py", "experiment=demo",
                          f"data.shards={shards}", f"trainer.output_dir={train_dir}", "trainer.overwrite=true",
                          f"trainer.num_threads={args.threads}", *steps, *args.train_override], args.threads)
    ckpt = train_dir / "checkpoints"
    video = out / "demo.mp4"
    prompt = "[" + ", ".join(json.dumps(p) for p in DEMO_PROMPT) + "]"
    times["generate"] = run([torchrun, "--standalone", "--nproc_per_node", "1", "magi_infer/generate.py",
                             "model=tiny_pixels", f"ckpt.dir={ckpt}", f"vae.dir={args.vae}",
                             f"sampler.num_steps={args.sample_steps}",
                             f"num_frames={24 * len(DEMO_PROMPT)}", f"prompt={prompt}", f"output={video}",
                             "overwrite=true", "progress=false"], args.threads)
    frame_strip(video, out / "demo_strip.png")
    print(f"wrote {video} and {out / 'demo_strip.png'}")
    runs = [f"demo@{args.sample_steps}:{ckpt}:{args.sample_steps}"]
    if args.distill_steps > 0:
        student = out / "distill" / "checkpoints"
        times["distill"] = run([torchrun, "--standalone", "--nproc_per_node", "1", "magi_train/train.py",
                                "experiment=distill_demo", f"distill.teacher={ckpt}", f"data.shards={shards}",
                                f"trainer.output_dir={out / 'distill'}", "trainer.overwrite=true",
                                f"trainer.num_threads={args.threads}", f"trainer.max_steps={args.distill_steps}",
                                f"trainer.save_every={args.distill_steps}"], args.threads)
        runs += [f"demo@8:{ckpt}:8", f"distilled@8:{student}:8", f"distilled@4:{student}:4"]
        times["distill_report"] = run([py, "tools/distill_report.py", "--teacher", str(ckpt), "--student",
                                       str(student), "--steps", "8", "4", "--samples", str(min(8, args.cases)), "--json",
                                       str(out / "distill_report.json")], args.threads)
    times["score"] = run([py, "tools/eval_prompt_following.py", "--vae", str(args.vae), "--cases", str(args.cases),
                          "--size", "128x128",
                          "--colour-fraction", "0.5" if args.colour_change > 0 else "0",
                          *[a for r in runs for a in ("--run", r)],
                          "--json", str(out / "scores.json")], args.threads)
    total = time.perf_counter() - start
    reports = json.loads((out / "scores.json").read_text())["runs"]
    print("\n" + "  ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"  total {total:.0f} s")
    print(f"demo video: {video}  frame strip: {out / 'demo_strip.png'}")
    for report in reports:
        print("prompt following of {} ({} held-out cases):".format(report["label"], report["cases"]))
        for key in ("colour", "direction", "switch"):
            value = report[key]
            print(f"  {key:<9} accuracy {'n/a' if value is None else f'{100 * value:.1f}%'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
