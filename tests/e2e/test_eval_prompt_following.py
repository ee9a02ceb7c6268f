"""tools/eval_prompt_following.py for real: a tiny trained DiT (tests/fixtures/tiny_base, released layout)
through MagiPipeline, decoded to 128x128 pixels by a released-architecture ViT VAE at random init
(tests/tiny_assets.py), two configurations in one call. A random decoder's scores are whatever they are: this
checks that the whole path runs and reports, not what it scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_assets import make_vae

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny_base"


@pytest.mark.slow
def test_the_tool_generates_scores_and_prints_the_table(tmp_path):
    vae = make_vae(tmp_path / "vae")
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "eval_prompt_following.py"), "--vae", str(vae), "--cases", "2",
         "--size", "128x128", "--run", f"base@8:{TINY}:8", "--run", f"base@4:{TINY}:4",
         "--json", str(tmp_path / "scores.json"), "--videos", str(tmp_path / "videos")],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    header = lines.index("2 held-out cases at 128x128, 48 frames, seed 0:")
    assert lines[header + 1].split() == ["run", "colour", "direction", "switch", "cases", "seconds"]
    assert [row.split()[0] for row in lines[header + 2:header + 4]] == ["base@8", "base@4"]
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert (scores["size"], scores["frames"]) == ([128, 128], 48)
    assert [(r["label"], r["steps"], r["cases"]) for r in scores["runs"]] == [("base@8", 8, 2), ("base@4", 4, 2)]
    for run in scores["runs"]:
        assert all(0.0 <= run[k] <= 1.0 for k in ("colour", "direction", "switch"))
        assert [len(c["chunks"]) for c in run["per_case"]] == [2, 2]
    # The same cases (captions) for both runs, and the videos they were scored on.
    assert scores["runs"][0]["per_case"][0]["captions"] == scores["runs"][1]["per_case"][0]["captions"]
    assert sorted(p.name for p in (tmp_path / "videos" / "base@4").iterdir()) == ["seed_0000.mp4", "seed_0001.mp4"]
