"""Rectified-flow training target of MAGI-1: x_t = (1 - t) noise + t x (objective.noisy_input), v* = x - noise."""

from __future__ import annotations

import torch


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return x - noise
