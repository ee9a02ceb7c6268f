"""Flow-matching conventions of MAGI-1 (t = 0 noise, t = 1 clean) and the training time sampler."""

import json
from pathlib import Path

import pytest
import torch

from magi_train.config.schema import OptimizerConfig
from magi_train.diffusion.objective import noisy_input
from magi_train.diffusion.time_grid import TimeGrid, shift_time
from magi_train.training.objectives.flow_matching import velocity_target
from magi_train.training.optim import lr_at

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_interpolation_endpoints_and_velocity_target():
    x = torch.randn(2, 3, 12, 4, 4)
    noise = torch.randn_like(x)
    frame_t = torch.tensor([[1.0] * 6 + [0.0] * 6, [0.25] * 6 + [0.75] * 6])
    xt = noisy_input(x, noise, frame_t)
    assert torch.equal(xt[0, :, :6], x[0, :, :6])  # t = 1: clean
    assert torch.equal(xt[0, :, 6:], noise[0, :, 6:])  # t = 0: pure noise
    assert torch.allclose(xt[1, :, :6], 0.75 * noise[1, :, :6] + 0.25 * x[1, :, :6])
    # v* = d x_t / d t = x - noise: an Euler step of size (1 - t) along it reaches the clean latent.
    v = velocity_target(x, noise)
    assert torch.allclose(xt[1, :, :6] + (1 - 0.25) * v[1, :, :6], x[1, :, :6], atol=1e-6)


def test_shift_formula_and_report_share_of_high_noise():
    t = torch.tensor([0.0, 0.5, 0.5625, 1.0])
    w = 1 / 3
    assert torch.allclose(shift_time(t, w), w * t / (1 - (1 - w) * t))
    # The share of times below 0.3 is checked in test_objective.py.


def test_sampler_time_grid_matches_released_sampler_bitwise():
    # t2v.json holds the grid the released code computed in fp32 for 8 steps (incl. its 1.0000001 end).
    released = json.loads((FIXTURES / "magi1_gelu" / "t2v.json").read_text())["t2v"]["timesteps"]
    ours = TimeGrid(8).t
    assert ours.tolist() == pytest.approx(released, abs=0.0)


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay="cosine")
    assert lr_at(0, cfg, 110) == pytest.approx(1e-4)
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 110) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr_at(110, cfg, 110) == pytest.approx(1e-4)
    const = OptimizerConfig(lr=1e-4, warmup_steps=1000, decay="constant")
    assert lr_at(5000, const, 10) == 1e-4
