"""tools/bench_startup.py measures what it says: a generation it starts reaches its first sampler step, and the
import table is read from real `-X importtime` output."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tools.bench_startup import main, parse_importtime


def test_importtime_output_is_parsed_into_modules_and_times():
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import json"], capture_output=True, text=True,
                          check=True, timeout=120)
    rows = {name: (own, cumulative) for name, own, cumulative in parse_importtime(done.stderr)}
    assert "json" in rows and "json.decoder" in rows
    assert rows["json"][1] >= rows["json.decoder"][1] and all(own >= 0 for own, _ in rows.values())


@pytest.mark.slow
def test_one_run_of_a_one_chunk_generation(capsys):
    report = main(["--runs", "1", "--sections", "generate"])  # (--help runs are timed by the same _timed)
    g = report["generate"]
    # The first sampler step comes after the process started and before it ended.
    assert 0 < g["startup_s"] < g["total_s"] and 0 < g["startup_cpu_s"] <= g["total_cpu_s"]
    assert "first sampler step" in capsys.readouterr().out
