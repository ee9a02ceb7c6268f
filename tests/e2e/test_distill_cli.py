"""Distillation end to end, as users run it: distil the tiny base model with experiment=distill_tiny, and check
with tools/distill_report.py that the distilled model's 8-step samples are closer to the teacher's 64-step samples
than the base model's own 8-step samples.

The teacher is tests/fixtures/tiny_base: the tiny base model as `experiment=tiny` trains it (400 steps on the
synthetic data), committed in the released layout (inference_weight/model.safetensors, fp32) so this test does not
retrain it; tests/fixtures/make_tiny_base.py says how it was made and regenerates it bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Relative to the repository root (the programs' working directory), as a user would type it.
TEACHER = "tests/fixtures/tiny_base"
# One intra-op thread: on a busy machine two threads spin against each other (a 66-step distillation on the shared
# 2-core machine at load ~3: 55 s with one thread, 170 s with two), and a fixed count repeats its numbers exactly.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
QUIET = ["trainer.progress_bar=false", "trainer.wandb.mode=disabled"]
# A short run of distill_tiny (its 1760 steps at 2e-4 are the CPU demo): 48 cycles of the 11 step sizes at 1e-3.
# Measured from this teacher, 8-step error vs its 64-step samples (the base model's own: 0.159), trainer.seed 1234
# (the preset's) unless noted; 440 steps passed at 1234 but not at every seed, 528 passes at each:
#   440 steps at 2e-4: 0.171   at 5e-4: 0.147   at 1e-3: 0.129 (seed 1: 0.161, seed 2: 0.147)   at 2e-3: 0.210
#   528 steps at 1e-3: 0.130 (seed 1: 0.139, seed 2: 0.142)
#   660 steps at 1e-3: 0.117 (seed 1: 0.097, seed 2: 0.097): a wider margin, for 25% more of the suite's
#   longest test (0.45 s of CPU a step); 528 keeps every seed 0.017 or more below the base model
DISTILL = ["trainer.max_steps=528", "optimizer.lr=1.0e-3"]


def run(*args: str, timeout: int = 3600) -> subprocess.CompletedProcess:
    # A generous limit: only a hung program should hit it, not a slow machine.
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_distilled_8_steps_beat_the_base_model_at_8_steps(tmp_path):
    assert (REPO / TEACHER / "inference_weight" / "model.safetensors").is_file(), \
        f"{TEACHER} is missing its weights (tests/fixtures/make_tiny_base.py regenerates them)"
    student = tmp_path / "distill"
    distilled = run("magi_train/train.py", "experiment=distill_tiny", f"distill.teacher={TEACHER}",
                    *DISTILL, f"trainer.output_dir={student}", "trainer.eval_every=0", *QUIET)
    teacher_line = [line for line in distilled.stdout.splitlines() if line.startswith("distillation: teacher")]
    assert teacher_line and f"released weights {TEACHER}/inference_weight" in teacher_line[0], distilled.stdout[-2000:]
    records = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    assert {r["step_size"] for r in records if "step_size" in r} == {1 / 64, 2 / 64, 4 / 64, 8 / 64, 16 / 64}
    report = run("tools/distill_report.py", "--teacher", TEACHER, "--student", f"{student}/checkpoints",
                 "--samples", "8", "--json", str(tmp_path / "report.json"))
    print(report.stdout)
    numbers = json.loads((tmp_path / "report.json").read_text())
    assert numbers["steps"] == 8 and numbers["samples"] == 8
    assert 0 < numbers["student_error"] < numbers["base_error"], numbers
