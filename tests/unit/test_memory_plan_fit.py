"""The search for the cheapest training setting that fits a budget (magi_train/observability/memory_plan_fit.py) and
tools/estimate_memory.py --fit."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from magi_train.config import load_model_preset
from magi_train.observability.memory_plan import GIB, Layout, MicroBatch, Tuning, estimate
from magi_train.observability.memory_plan_fit import fit, recompute_options, settings

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 9360  # 480 x 832 pixels: 30 x 52 tokens per latent frame, 6 latent frames per chunk
MB = MicroBatch(seq_length=4 * CHUNK, micro_batch_size=2, chunk_tokens=CHUNK, attention="flash", backend="flash")


@pytest.fixture(scope="module")
def cfg():
    return load_model_preset("magi1_4.5b")


def _direct(cfg, s, tuning):
    """The estimate of a setting, built by hand from the trainer's fields (not through the search)."""
    layout = Layout(recompute=s.recompute, recompute_layers=s.recompute_layers)
    mb = replace(MB, seq_length=s.chunks * CHUNK, micro_batch_size=s.micro_batch_size)
    t = replace(tuning, lora_rank=s.lora_rank, base_dtype=s.base_dtype) if tuning.lora else tuning
    return estimate(cfg, layout, mb, tuning=t)


@pytest.mark.parametrize("tuning,gib", [(Tuning(16), 40), (Tuning(16), 20), (Tuning(), 200)])
def test_fit_is_below_the_budget_and_the_next_cheaper_setting_above(cfg, tuning, gib):
    found = fit(cfg, gib * GIB, MB, tuning)
    assert found is not None
    s = found.setting
    assert found.estimate.total == _direct(cfg, s, tuning).total <= gib * GIB
    prev, prev_est = found.previous
    assert prev_est.total == _direct(cfg, prev, tuning).total > gib * GIB
    # The neighbour one step cheaper along each axis that was given up does not fit either.
    layers = cfg.num_layers
    if s.recompute == "full" and s.recompute_layers != 1:
        fewer = replace(s, recompute_layers=(s.recompute_layers or layers) - 1)
        assert _direct(cfg, fewer, tuning).total > gib * GIB
    if s.micro_batch_size < MB.micro_batch_size:
        assert _direct(cfg, replace(s, micro_batch_size=s.micro_batch_size + 1), tuning).total > gib * GIB
    if s.chunks < 4:  # a longer clip fits with no setting: the most recompute at micro-batch 1
        most = replace(s, chunks=s.chunks + 1, recompute="full", recompute_layers=0, micro_batch_size=1)
        assert _direct(cfg, most, tuning).total > gib * GIB
    # Every setting tried before it was over the budget.
    order = list(settings(cfg, Layout(), tuning, CHUNK, 4, 2, cfg.caption_max_length, [tuning.base_dtype],
                          [tuning.lora_rank] if tuning.lora else [0]))
    assert order.index(s) > 0 and order[order.index(s) - 1] == prev


def test_fit_gives_up_compute_first_then_the_clip(cfg):
    roomy = fit(cfg, 10_000 * GIB, MB, Tuning(16))
    assert roomy.previous is None and (roomy.setting.recompute, roomy.setting.micro_batch_size, roomy.setting.chunks) \
        == ("none", 2, 4)
    tight = fit(cfg, 20 * GIB, MB, Tuning(16))
    assert tight.setting.recompute == "full" and tight.setting.micro_batch_size == 1
    assert fit(cfg, 1 * GIB, MB, Tuning(16)) is None
    # Full fine-tuning of 4.5B does not fit one 80 GiB GPU (weights, fp32 gradients and AdamW state alone: 75 GiB
    # of its 4.5B bf16 parameters); ZeRO-2 over two GPUs halves the optimizer state and it fits.
    assert fit(cfg, 76 * GIB, MB, Tuning()) is None
    two = fit(cfg, 76 * GIB, MB, Tuning(), Layout(dp=2))
    assert two is not None and two.estimate.optimizer < estimate(cfg, Layout(), MB).optimizer


def test_recompute_options_are_ordered_by_the_flops_they_rerun(cfg):
    options = recompute_options(cfg, cfg.num_layers, CHUNK, 4, cfg.caption_max_length, lora=True)
    costs = [c for _, _, c in options]
    assert options[0] == ("none", 0, 0.0) and costs == sorted(costs)
    assert options[-1][:2] == ("full", 0)  # every layer re-run is the most expensive
    assert len(options) == 1 + 2 * cfg.num_layers
    # Re-running the whole forward of every layer: a third of a step without weight gradients (LoRA), less than a
    # quarter with them.
    assert options[-1][2] == pytest.approx(0.5, rel=0.1)
    full = dict(((rc, k), c) for rc, k, c in recompute_options(cfg, cfg.num_layers, CHUNK, 4, 800, lora=False))
    assert full[("full", 0)] < options[-1][2]


def test_tool_fit_prints_the_setting_and_its_overrides():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools/estimate_memory.py"), "--model", "magi1_4.5b", "--lora-rank", "16",
         "--height", "480", "--width", "832", "--chunks", "4", "--attention-backend", "flash", "--fit", "40"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "LoRA rank=16" in out.stdout and "37440 tokens" in out.stdout
    assert "Cheapest setting that fits 40 GiB" in out.stdout and "trainer.recompute=full" in out.stdout
    assert "The next cheaper setting" in out.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "tools/estimate_memory.py"), "--model", "magi1_4.5b",
                          "--height", "480", "--width", "830", "--chunks", "4"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert bad.returncode != 0 and "--width 830 is not a multiple of 16 pixels" in bad.stderr


def test_fine_tune_table_rows_fit_their_gpus():
    """The README's table: every row's estimate within 95% of its GPU, LoRA on one 24 and one 80 GiB GPU."""
    out = subprocess.run([sys.executable, str(ROOT / "tools/estimate_memory.py"), "--fine-tune-table"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| ") and " x " in line]
    fitted = {}
    for run, gpu, setting, gib, _ in rows:
        count, size = gpu.split(" GiB")[0].split(" x ")
        if gib.strip() != "-":
            assert float(gib) <= 0.95 * float(size) + 0.05, (run, gpu, gib)
            fitted[(run.strip(), int(count), int(size))] = setting
    assert ("LoRA rank 16", 1, 24) in fitted and ("LoRA rank 16", 1, 80) in fitted
    assert "480x832, 4 chunks (96 frames, 37440 tokens)" in out.stdout
