"""Flow-matching time: training samplers and the inference grid. Convention: t = 0 noise, t = 1 clean."""

from __future__ import annotations

import torch

from magi_train.config.schema import DiffusionConfig


def shift_time(t: torch.Tensor, w: float) -> torch.Tensor:
    """SD3-style shift t' = w t / (1 - (1 - w) t); w = 1/3 pushes mass toward noise (small t).

    Evaluated as the released code does, `w t / (1 + (w - 1) t)`: algebraically equal, and the fp32
    rounding of this form is what the released sampler grid uses.
    """
    return w * t / (1 + (w - 1) * t)


def logit_normal(shape, mean: float, std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.sigmoid(mean + std * torch.randn(shape, generator=generator))


def sample_training_times(batch: int, chunks: int, cfg: DiffusionConfig, generator: torch.Generator):
    """Per-chunk times for a batch of chunked videos, and which chunks are clean context.

    Returns t (batch, chunks) fp32 and clean (batch, chunks) bool. Along the chunk index t never increases
    (earlier chunks are cleaner, as at inference where the oldest chunk of the window is the most
    denoised): each sample draws `chunks` times from the shifted logit-normal of the MAGI-1 report
    (m = 0, s = 0.5, w = 1/3) and sorts them in descending order. With probability `clean_prefix_prob` a
    sample starts with 1..chunks-1 clean chunks (video continuation); those get t ~ U[clean_t_min, 1]
    (MAGI-1 adds up to 5% noise to clean chunks) and carry no loss.
    """
    t = shift_time(logit_normal((batch, chunks), cfg.t_logit_mean, cfg.t_logit_std, generator), cfg.t_shift)
    t = torch.sort(t, dim=1, descending=True).values
    clean = torch.zeros(batch, chunks, dtype=torch.bool)
    if chunks > 1 and cfg.clean_prefix_prob > 0:
        has_prefix = torch.rand(batch, generator=generator) < cfg.clean_prefix_prob
        n_clean = torch.randint(1, chunks, (batch,), generator=generator)
        clean = has_prefix[:, None] & (torch.arange(chunks)[None, :] < n_clean[:, None])
        clean_t = cfg.clean_t_min + (1 - cfg.clean_t_min) * torch.rand(batch, chunks, generator=generator)
        t = torch.where(clean, clean_t, t)
        # Keep monotonicity even if a noisy draw exceeded a clean one (vanishingly rare with w = 1/3).
        t = torch.cummin(t, dim=1).values
    return t, clean


def inference_grid(num_steps: int, shift: float = 1.0 / 3.0) -> torch.Tensor:
    """MAGI-1's sampler grid for `num_steps` steps (num_steps + 1 values from 0 to 1): u², then the shift."""
    u = torch.linspace(0, 1, num_steps + 1, dtype=torch.float32)
    return shift_time(u * u, shift)
