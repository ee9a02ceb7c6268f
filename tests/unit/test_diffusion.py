"""Flow-matching conventions of MAGI-1 (t = 0 noise, t = 1 clean) and the training time sampler."""

import json
import math
from pathlib import Path

import pytest
import torch

from magi_train.config.schema import DiffusionConfig, OptimizerConfig
from magi_train.diffusion.flow_matching import interpolate, masked_mse, velocity_target
from magi_train.diffusion.timesteps import inference_grid, sample_training_times, shift_time
from magi_train.optim import lr_at

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_interpolation_endpoints_and_velocity_target():
    x = torch.randn(2, 3, 12, 4, 4)
    noise = torch.randn_like(x)
    t = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    xt = interpolate(x, noise, t, frames_per_chunk=6)
    assert torch.equal(xt[0, :, :6], x[0, :, :6])  # t = 1: clean
    assert torch.equal(xt[0, :, 6:], noise[0, :, 6:])  # t = 0: pure noise
    assert torch.allclose(xt[1, :, :6], 0.75 * noise[1, :, :6] + 0.25 * x[1, :, :6])
    # v* = d x_t / d t = x - noise: an Euler step of size (1 - t) along it reaches the clean latent.
    v = velocity_target(x, noise)
    assert torch.allclose(xt[1, :, :6] + (1 - 0.25) * v[1, :, :6], x[1, :, :6], atol=1e-6)


def test_masked_mse_counts_only_noisy_chunks():
    pred = torch.zeros(1, 2, 12, 2, 2)
    target = torch.cat([torch.full((1, 2, 6, 2, 2), 3.0), torch.full((1, 2, 6, 2, 2), 1.0)], dim=2)
    assert masked_mse(pred, target, torch.tensor([[0.0, 1.0]]), 6).item() == pytest.approx(1.0)
    assert masked_mse(pred, target, torch.tensor([[1.0, 0.0]]), 6).item() == pytest.approx(9.0)
    assert masked_mse(pred, target, torch.tensor([[1.0, 1.0]]), 6).item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="no noisy chunk"):
        masked_mse(pred, target, torch.tensor([[0.0, 0.0]]), 6)


def test_shift_formula_and_report_share_of_high_noise():
    t = torch.tensor([0.0, 0.5, 0.5625, 1.0])
    w = 1 / 3
    assert torch.allclose(shift_time(t, w), w * t / (1 - (1 - w) * t))
    # MAGI-1 report: logit-normal(0, 0.5) then shift 1/3 puts ~70% of the samples at t < 0.3.
    times, _ = sample_training_times(20000, 1, DiffusionConfig(clean_prefix_prob=0.0), torch.Generator().manual_seed(0))
    share = (times < 0.3).float().mean().item()
    z = 0.5625 / (1 - 0.5625)  # t' < 0.3 <=> t < 0.5625 <=> logit(t) < ln(z)
    expected = 0.5 * (1 + math.erf(math.log(z) / (0.5 * math.sqrt(2))))
    assert share == pytest.approx(expected, abs=0.01)
    assert 0.68 < expected < 0.70


def test_chunk_times_monotone_and_clean_prefix():
    cfg = DiffusionConfig(clean_prefix_prob=0.5, clean_t_min=0.95)
    t, clean = sample_training_times(512, 4, cfg, torch.Generator().manual_seed(1))
    assert bool((t[:, 1:] <= t[:, :-1]).all()), "t must not increase along the chunk index"
    # Clean chunks are a leading run, never the whole sample, and get t in [0.95, 1].
    assert not bool(clean[:, -1].any())
    assert bool((clean[:, 1:] <= clean[:, :-1]).all())
    assert bool((t[clean] >= 0.95).all()) and bool((t[clean] <= 1.0).all())
    assert 0.35 < clean[:, 0].float().mean().item() < 0.65


def test_inference_grid_matches_released_sampler_bitwise():
    # t2v.json holds the grid the released code computed in fp32 for 8 steps (incl. its 1.0000001 end).
    released = json.loads((FIXTURES / "magi1_gelu" / "t2v.json").read_text())["t2v"]["timesteps"]
    ours = inference_grid(8)
    assert ours.tolist() == pytest.approx(released, abs=0.0)


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay="cosine")
    assert lr_at(0, cfg, 110) == pytest.approx(1e-4)
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 110) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr_at(110, cfg, 110) == pytest.approx(1e-4)
    const = OptimizerConfig(lr=1e-4, warmup_steps=1000, decay="constant")
    assert lr_at(5000, const, 10) == 1e-4
