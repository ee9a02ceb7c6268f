"""Classifier-free guidance of MAGI-1 inference (and of the distillation teacher): the t-bucketed scales, the
three-pass combination and the distilled models' nearly-clean blend.

Everything is computed in fp32 with the released operation order, so that a generation with the released
weights follows the released sampler to the last bit (t = 0 is noise, t = 1 is clean). The time grid the
sampler walks is `magi_train/diffusion/time_grid.py`.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

# The released scales (t bucket edges, w_prev and w_text per bucket) are defined once, beside the config
# defaults that use them: magi_train/config/schema.py RELEASED_CFG_T_RANGE / _PREV_CHUNK_SCALES / _TEXT_SCALES.


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
