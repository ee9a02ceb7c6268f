"""tools/gpu_bench.py --dry-run: every section runs at tiny sizes on the CPU and the JSON / markdown have the
shape the GPU run writes (so `make gpu-bench` does not rot between GPU runs)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_writes_every_section(tmp_path):
    proc = subprocess.run([sys.executable, "tools/gpu_bench.py", "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["dry_run"] is True and report["schema_version"] == 1
    s = report["sections"]
    assert set(s) == {"tests", "attention", "train", "inference"}
    assert s["tests"]["status"] == "skipped: --dry-run"

    rows = s["attention"]["rows"]
    measured = [r for r in rows if r["status"] == "ok"]
    # sdpa and torch run on every CPU, forward and backward, at both dry-run sizes.
    assert {(r["backend"], r["tokens"]) for r in measured} >= {("sdpa", 256), ("sdpa", 512), ("torch", 256),
                                                               ("torch", 512)}
    for r in measured:
        assert r["head_dim"] == 32 and r["forward_tflops"] > 0 and r["backward_tflops"] > 0
    # Every backend is listed; those that cannot run say why instead of being dropped.
    assert {r["backend"] for r in rows} == {"magi", "flash", "flex", "sdpa", "torch"}
    assert all(r["status"] == "ok" or r["status"].startswith(("unavailable", "failed", "skipped")) for r in rows)

    bf16 = s["train"]["runs"]["bf16"]
    assert bf16["status"] == "ok", bf16
    assert bf16["layers"] == 2 and bf16["tokens"] == 192 and bf16["step_ms"] > 0 and bf16["tflops_per_device"] > 0
    assert bf16["estimate_bytes"] > 0 and bf16["mfu"] is None  # no known peak on a CPU
    assert s["train"]["runs"]["fp8"]["status"].startswith("unavailable")

    inf = s["inference"]
    assert inf["status"] == "ok", inf
    assert inf["chunks"] == 2 and inf["per_chunk_ms"] == pytest.approx(inf["forward_ms"] / 2) and inf["tflops"] > 0

    md = (tmp_path / "gpu_bench.md").read_text()
    for heading in ("## tests/gpu", "## Attention", "## Training step", "## Inference forward"):
        assert heading in md
    assert "| sdpa | 256 | 32 |" in md
