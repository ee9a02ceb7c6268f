"""A style LoRA does what it is for: an adapter trained for 300 CPU steps on one-colour clips (every blob red,
captions unchanged: `data.style_colour=red`), its targets including the cross-attention key/value linear, on the
trained tiny base makes red dominate generations whose captions ask for other colours, while the base keeps the
colours the captions name. Run as users run it: tools/lora_style_shift.py, which launches the trainer
(`experiment=lora_tiny`) and then measures (magi_train/training/evaluation/style_shift.py). The README's figure is
the tool's default recipe with more captions and sampler steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_BASE = REPO / "tests" / "fixtures" / "tiny_base"

pytestmark = pytest.mark.slow


def test_style_adapter_moves_generations_to_its_colour_and_the_base_does_not(tmp_path):
    report_path = tmp_path / "style.json"
    cmd = [sys.executable, "tools/lora_style_shift.py", "--base", str(TINY_BASE), "--run", str(tmp_path / "run"),
           "--style", "red", "--train-steps", "300", "--samples", "8", "--steps", "16", "--json", str(report_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report = json.loads(report_path.read_text())
    assert report["train_steps"] == 300 and report["samples"] == 8
    base, adapted = report["scores"]["base"], report["scores"]["adapted"]
    summary = done.stdout[-1500:]
    # The base follows the captions (none of them names red) ...
    assert base["style_share"] < 0.1 and base["style_dominant"] == 0.0, summary
    assert base["prompt_dominant"] >= 0.75, summary
    # ... the adapter overrides them with its style (the README's 16-caption figures: share 0.43-0.55, red
    # dominant in 88-100%, for two training seeds; the bounds here leave room for other thread counts).
    assert adapted["style_share"] > base["style_share"] + 0.25, summary
    assert adapted["style_dominant"] >= 0.5, summary
    assert adapted["prompt_dominant"] <= 0.5, summary
