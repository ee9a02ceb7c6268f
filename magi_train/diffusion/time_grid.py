"""Flow-matching time: the shift, the training-time draw and the sampler's time grid.

Convention (one, used everywhere): t = 0 is noise, t = 1 is clean, and a shift w maps t to
`w t / (1 - (1 - w) t)` (SD3's shift written for this direction of t); w < 1 pushes times toward noise.
MAGI-1 uses w = 1/3 for both the training draw (diffusion.t_shift) and the sampler grid (RELEASED_SHIFT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RELEASED_SHIFT = 1.0 / 3.0  # the released sampler grid: t = s / (3 - 2 s)
SHORTCUT_STEPS = 12  # the distilled "shortcut" grid: step sizes (2,1,1)/16 or (1,1,2)/16, repeating
SHORTCUT_MODES = ("8,16,16", "16,16,8")
# The step-size embedding input is `steps / 4 * 2` (released): 64 steps -> 32, 16 -> 8.
_STEP_INPUT_SCALE = 2.0
_SHORTCUT_BASE_STEPS = 4


def shift_time(t: torch.Tensor, w: float) -> torch.Tensor:
    """t' = w t / (1 - (1 - w) t); w = 1/3 pushes mass toward noise (small t).

    Evaluated as the released code does, `w t / (1 + (w - 1) t)`: algebraically equal, and the fp32
    rounding of this form is what the released sampler grid uses.
    """
    return w * t / (1 + (w - 1) * t)


def grid_time(u: torch.Tensor, w: float) -> torch.Tensor:
    """The sampler grid's map from position u in [0, 1] to time: u² (released power 2), then the shift."""
    return shift_time(u * u, w)


def logit_normal(shape, mean: float, std: float, generator: torch.Generator) -> torch.Tensor:
    """The training-time draw before the shift: sigmoid of a normal."""
    return torch.sigmoid(mean + std * torch.randn(shape, generator=generator))


def _check_mode(shortcut_mode: str) -> None:
    if shortcut_mode not in SHORTCUT_MODES:
        raise ValueError(f"sampler.shortcut_mode={shortcut_mode!r} is not one of {list(SHORTCUT_MODES)}")


@dataclass(frozen=True)
class TimeGrid:
    """The num_steps + 1 times a sampler visits: u in [0, 1], s = u², t = shift_time(s, shift) (released).

    For 12 steps u is the shortcut grid: 1/16-steps grouped (2,1,1) ("8,16,16") or (1,1,2) ("16,16,8"). The
    grid also says how long each step is in units of the smallest (`intervals`) and what a distilled model's
    step-size embedding is fed for a step (`step_size_input`)."""

    num_steps: int
    shortcut_mode: str = "8,16,16"
    shift: float = RELEASED_SHIFT

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"sampler.num_steps must be >= 1, got {self.num_steps}")

    @property
    def t(self) -> torch.Tensor:
        """(num_steps + 1,) fp32 times, 0 (noise) to 1 (clean; 1 + 1 ulp in fp32, as released)."""
        if self.num_steps == SHORTCUT_STEPS:
            _check_mode(self.shortcut_mode)
            quarter = torch.linspace(0, 1, 5) / 4  # 0, 1/16, ..., 4/16
            base = quarter[:3] if self.shortcut_mode == "16,16,8" else torch.cat([quarter[:1], quarter[2:4]])
            u = torch.cat([base + a for a in torch.linspace(0, 1, 5)])[: self.num_steps + 1]
        else:
            u = torch.linspace(0, 1, self.num_steps + 1)
        return grid_time(u, self.shift)

    @property
    def intervals(self) -> torch.Tensor:
        """Step multiplicity (in units of the smallest step) of each step inside a stage; only the 12-step
        shortcut grid has unequal steps (the pattern is laid over any multiple of 3, where it is unused)."""
        if self.num_steps % 3 == 0:
            _check_mode(self.shortcut_mode)
            pattern = [1, 1, 2] if self.shortcut_mode == "16,16,8" else [2, 1, 1]
            return torch.tensor(pattern * (self.num_steps // 3))
        return torch.ones(self.num_steps)

    def step_size_input(self, interval: float = 1.0) -> float:
        """Input of a distilled model's step-size embedding for a step of `interval` smallest steps."""
        if self.num_steps == SHORTCUT_STEPS:
            return _SHORTCUT_BASE_STEPS / float(interval) * _STEP_INPUT_SCALE
        return self.num_steps / 4 * _STEP_INPUT_SCALE
