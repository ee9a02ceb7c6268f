"""Sampler arithmetic of MAGI-1 inference: the t grid, the distill step-size input, and guidance.

Everything is computed in fp32 with the released operation order, so that a generation with the released
weights follows the released sampler to the last bit (t = 0 is noise, t = 1 is clean).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

from magi_train.diffusion.timesteps import shift_time

SHORTCUT_STEPS = 12  # the distilled "shortcut" grid: step sizes (2,1,1)/16 or (1,1,2)/16, repeating
SHORTCUT_MODES = ("8,16,16", "16,16,8")
# The distill embedding input is `steps_per_stage_unit * 2`: 64 steps -> 32, 16 -> 8 (released).
_DISTILL_DT_SCALE = 2.0
_SHORTCUT_BASE_STEPS = 4


def _check_mode(shortcut_mode: str) -> None:
    if shortcut_mode not in SHORTCUT_MODES:
        raise ValueError(f"sampler.shortcut_mode={shortcut_mode!r} is not one of {list(SHORTCUT_MODES)}")


def time_grid(num_steps: int, shortcut_mode: str = "8,16,16", shift: float = 3.0) -> torch.Tensor:
    """The num_steps + 1 values of t: u in [0, 1], s = u^2, t = s / (shift - (shift - 1) s) (released form).

    For 12 steps u is the shortcut grid: 1/16-steps grouped (2,1,1) ("8,16,16") or (1,1,2) ("16,16,8")."""
    if num_steps < 1:
        raise ValueError(f"sampler.num_steps must be >= 1, got {num_steps}")
    if num_steps == SHORTCUT_STEPS:
        _check_mode(shortcut_mode)
        quarter = torch.linspace(0, 1, 5) / 4  # 0, 1/16, ..., 4/16
        base = quarter[:3] if shortcut_mode == "16,16,8" else torch.cat([quarter[:1], quarter[2:4]])
        u = torch.cat([base + a for a in torch.linspace(0, 1, 5)])[: num_steps + 1]
    else:
        u = torch.linspace(0, 1, num_steps + 1)
    return shift_time(u * u, 1.0 / shift)


def step_intervals(num_steps: int, shortcut_mode: str = "8,16,16") -> torch.Tensor:
    """Step multiplicity (in units of the smallest step) of each step inside a stage; only the 12-step
    shortcut grid has unequal steps."""
    if num_steps % 3 == 0:
        _check_mode(shortcut_mode)
        pattern = [1, 1, 2] if shortcut_mode == "16,16,8" else [2, 1, 1]
        return torch.tensor(pattern * (num_steps // 3))
    return torch.ones(num_steps)


def distill_dt(num_steps: int, interval: float) -> float:
    """Input of the step-size embedding of a distilled model for one step (released convention)."""
    if num_steps == SHORTCUT_STEPS:
        return _SHORTCUT_BASE_STEPS / float(interval) * _DISTILL_DT_SCALE
    return num_steps / 4 * _DISTILL_DT_SCALE


def cfg_scales(t: torch.Tensor, t_range: Sequence[float], prev_scales: Sequence[float],
               text_scales: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(s_prev, s_text) of the t bucket each entry of `t` falls in; bucket edges are `t_range` - 1e-7."""
    if not len(t_range) == len(prev_scales) == len(text_scales):
        raise ValueError(f"sampler.cfg_t_range ({len(t_range)}), prev_chunk_scales ({len(prev_scales)}) and "
                         f"text_scales ({len(text_scales)}) must have the same length")
    edges = torch.tensor(list(t_range), dtype=torch.float32) - 1e-7
    index = torch.searchsorted(edges, t.float()) - 1
    if bool((index < 0).any()):
        raise ValueError(f"t {t.tolist()} lies below sampler.cfg_t_range[0] = {t_range[0]}")
    return (torch.tensor(list(prev_scales), dtype=torch.float32)[index],
            torch.tensor(list(text_scales), dtype=torch.float32)[index])


def combine_cfg3(uncond: torch.Tensor, cond_context: torch.Tensor, cond_text: torch.Tensor,
                 s_prev: torch.Tensor, s_text: torch.Tensor) -> torch.Tensor:
    """Three-pass MAGI-1 guidance for one chunk:
    uncond + s_prev (context - uncond) + s_text (text - context), in the released operation order."""
    return (1 - s_prev) * uncond + (s_prev - s_text) * cond_context + s_text * cond_text


def blend_nearly_clean(with_context: torch.Tensor, alone: torch.Tensor, weight: float) -> torch.Tensor:
    """Distilled models: the oldest chunk's velocity mixes the prediction with context (`weight`) and the
    one without (its duplicate attending only to itself)."""
    return with_context * weight + alone * (1 - weight)
