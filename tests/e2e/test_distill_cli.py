"""Distillation end to end, as users run it: train the tiny base model on the synthetic data, distil it with
experiment=distill_tiny, and check with tools/distill_report.py that the distilled model's 8-step samples are
closer to the teacher's 64-step samples than the base model's own 8-step samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}
QUIET = ["trainer.progress_bar=false", "trainer.wandb.mode=disabled"]


def run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_distilled_8_steps_beat_the_base_model_at_8_steps(tmp_path):
    base, student = tmp_path / "base", tmp_path / "distill"
    run("magi_train/train.py", "experiment=tiny", f"trainer.output_dir={base}", "trainer.eval_every=0",
        "trainer.save_every=0", *QUIET)
    distilled = run("magi_train/train.py", "experiment=distill_tiny", f"distill.teacher={base}/checkpoints",
                    f"trainer.output_dir={student}", "trainer.eval_every=0", *QUIET)
    assert "distillation: teacher checkpoint" in distilled.stdout
    records = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    assert {r["step_size"] for r in records if "step_size" in r} <= {1 / 64, 2 / 64, 4 / 64, 8 / 64}
    report = run("tools/distill_report.py", "--teacher", f"{base}/checkpoints", "--student", f"{student}/checkpoints",
                 "--samples", "8", "--json", str(tmp_path / "report.json"))
    print(report.stdout)
    numbers = json.loads((tmp_path / "report.json").read_text())
    assert numbers["steps"] == 8 and numbers["samples"] == 8
    assert 0 < numbers["student_error"] < numbers["base_error"], numbers
