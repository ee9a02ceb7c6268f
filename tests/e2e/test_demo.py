"""`make demo` (tools/demo.py) end to end at a small size: every step runs as the user's command (synthetic clips,
shards through the shipped data/tiny_vae, torchrun training of experiment=demo, generate.py with model=tiny_pixels,
the prompt-following score) and the demo writes its mp4, frame strip and scores and prints the three scores; with
--distill-steps also the distillation of the demo model, its distill report and the scores of base@8,
distilled@8 and distilled@4.
A few training steps score whatever they score: this checks the chain, tools/demo.py's defaults are the benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_demo_trains_generates_pixels_and_prints_its_scores(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "demo.py"), "--out", str(out), "--clips", "6", "--steps", "3",
         "--sample-steps", "4", "--cases", "2", "--threads", "1", "--distill-steps", "6"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    for name in ("demo.mp4", "demo_strip.png", "scores.json", "distill_report.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert len(list((out / "shards").glob("*.tar"))) >= 1
    assert (out / "train" / "checkpoints").is_dir()

    import av

    with av.open(str(out / "demo.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 72 and frames[0].shape == (128, 128, 3)  # three 24-frame chunks, decoded pixels

    lines = done.stdout.splitlines()
    reports = json.loads((out / "scores.json").read_text())["runs"]
    assert [(r["label"], r["steps"]) for r in reports] == [("demo@4", 4), ("demo@8", 8), ("distilled@8", 8),
                                                           ("distilled@4", 4)]
    for report in reports:
        assert report["cases"] == 2
        start = lines.index(f"prompt following of {report['label']} (2 held-out cases):")
        rows = [line.split() for line in lines[start + 1:start + 4]]
        assert [r[0] for r in rows] == ["colour", "direction", "switch"] and all(r[1] == "accuracy" for r in rows)
        for row, key in zip(rows, ("colour", "direction", "switch")):
            value = report[key]
            assert row[2] == ("n/a" if value is None else f"{100 * value:.1f}%")
    distill = json.loads((out / "distill_report.json").read_text())["reports"]
    assert [(r["steps"], r["samples"]) for r in distill] == [(8, 2), (4, 2)]
    assert all(r["base_error"] > 0 and r["student_error"] > 0 for r in distill)
    assert np.asarray(frames).std() > 0  # not a blank video
