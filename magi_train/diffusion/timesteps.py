"""Flow-matching time: training samplers and the inference grid. Convention: t = 0 noise, t = 1 clean."""

from __future__ import annotations

import torch



def shift_time(t: torch.Tensor, w: float) -> torch.Tensor:
    """SD3-style shift t' = w t / (1 - (1 - w) t); w = 1/3 pushes mass toward noise (small t).

    Evaluated as the released code does, `w t / (1 + (w - 1) t)`: algebraically equal, and the fp32
    rounding of this form is what the released sampler grid uses.
    """
    return w * t / (1 + (w - 1) * t)


def logit_normal(shape, mean: float, std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.sigmoid(mean + std * torch.randn(shape, generator=generator))


def inference_grid(num_steps: int, shift: float = 1.0 / 3.0) -> torch.Tensor:
    """MAGI-1's sampler grid for `num_steps` steps (num_steps + 1 values from 0 to 1): u², then the shift."""
    u = torch.linspace(0, 1, num_steps + 1, dtype=torch.float32)
    return shift_time(u * u, shift)
