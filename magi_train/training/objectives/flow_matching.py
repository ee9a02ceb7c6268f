"""MAGI-1's rectified-flow objective: x_t = (1 - t) noise + t x (diffusion/objective.noisy_input), v* = x - noise,
with the multi-task draw (t2v / i2v / v2v, clean frames without loss, caption dropout) of
magi_train/diffusion/objective.py."""

from __future__ import annotations

from typing import Optional

import torch

from magi_train.config.schema import DiffusionConfig
from magi_train.diffusion.objective import ObjectiveDraw, draw_objective, fixed_draw
from magi_train.training.objectives.base import Objective, generator


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v* = d x_t / d t = x - noise."""
    return x - noise


class FlowMatching(Objective):
    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg

    def draw(self, latent_frames: int, chunk_frames: int, seed: int, fixed_t: Optional[float]) -> ObjectiveDraw:
        """Task, times, clean frames and caption dropout (`fixed_t`: validation, every chunk at that t)."""
        if fixed_t is not None:
            return fixed_draw(latent_frames, chunk_frames, fixed_t)
        return draw_objective(latent_frames, chunk_frames, latent_frames == 1, self.cfg, generator(seed))
