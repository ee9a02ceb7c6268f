"""Learnable 3-D rotary position embedding of MAGI-1.

16 learnable frequency bands (`rope.bands`, init 10000^(-k/16)) are shared by the time, height and width
axes. Each token gets 48 angles `[t*b, h*b, w*b]`; the table is `[sin(angles) | cos(angles)]` (S, 96) and is
applied "rotate-half" style (GPT-NeoX, flash-attn `interleaved=False`) to the first 96 of the 128 head dims.
Spatial coordinates are centred and rescaled to a 16x16-token reference grid so that any resolution sees the
same angular range; time coordinates are absolute latent-frame indices.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn


def default_bands(num_bands: int, temperature: float) -> torch.Tensor:
    """(num_bands,) fp32 on the CPU whatever the ambient device: arithmetic on the meta device runs Python
    decompositions whose first call imports torch._dynamo (0.7 s of every start-up that builds on meta)."""
    exponent = torch.arange(0, num_bands, 1, dtype=torch.int64, device="cpu").to(torch.float32) / num_bands
    return 1.0 / (temperature**exponent)


def _axis_coords(size: int, reference: float, centre: bool) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.int64).to(torch.float32)
    if centre:
        coords = coords - (size - 1) / 2
    if size == 1:
        # The released code asserts a reference of 1 here; a 1-token axis cannot be rescaled.
        if reference != 1:
            raise ValueError(f"RoPE: an axis of 1 token needs a reference size of 1, got {reference}")
        return coords
    # Order of operations as released (x / (f - 1) * (r - 1)) so fp32 rounding matches.
    return coords / (size - 1) * (reference - 1)


def rope_coords(frames: int, height: int, width: int, reference_tokens: int, frame_offset: int = 0) -> torch.Tensor:
    """(frames*height*width, 3) fp32 (t, h, w) coordinates of a T-major token grid whose first frame has absolute
    index `frame_offset`; what the angles are computed from (packed sequences carry them per token)."""
    total_t = frames + frame_offset
    rescale = math.sqrt(height * width / (reference_tokens * reference_tokens))
    ref = (total_t, height / rescale, width / rescale)
    t = _axis_coords(total_t, ref[0], centre=False)
    h = _axis_coords(height, ref[1], centre=True)
    w = _axis_coords(width, ref[2], centre=True)
    grid = torch.stack(torch.meshgrid(t, h, w, indexing="ij"), dim=-1).reshape(-1, 3)
    return grid[frame_offset * height * width:]


class LearnableRope3D(nn.Module):
    def __init__(self, head_dim: int, temperature: float = 10000.0, reference_tokens: int = 16):
        super().__init__()
        self.num_bands = head_dim // 8
        self.reference_tokens = reference_tokens
        self.temperature = temperature
        self.bands = nn.Parameter(torch.empty(self.num_bands, dtype=torch.float32))  # ambient device (meta too)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The constructor's bands again (a model materialised from the meta device starts here)."""
        self.bands.copy_(default_bands(self.num_bands, self.temperature))  # copy_ moves it to the bands' device

    @property
    def rotary_dim(self) -> int:
        return 6 * self.num_bands

    def table(self, frames: int, height: int, width: int, frame_offset: int = 0) -> torch.Tensor:
        """(frames*height*width, rotary_dim) fp32 table for a T-major token grid whose first frame has
        absolute index `frame_offset` (earlier frames live in the KV cache)."""
        return self.table_at(rope_coords(frames, height, width, self.reference_tokens, frame_offset))

    def table_at(self, coords: torch.Tensor) -> torch.Tensor:
        """(S, rotary_dim) fp32 table of tokens at (S, 3) coordinates `[sin(angles) | cos(angles)]`."""
        angles = (coords.to(self.bands.device).unsqueeze(-1) * self.bands.float()).reshape(coords.shape[0], -1)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


def split_table(table: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    sin, cos = table.tensor_split(2, -1)
    return sin, cos


def apply_rotary(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate-half on the first 2*len(sin) dims of x (..., S, H, D) with sin/cos (S, R/2); fp32 maths."""
    half = sin.shape[-1]
    rot = 2 * half
    x1, x2, rest = x[..., :half], x[..., half:rot], x[..., rot:]
    s = sin[:, None, :]
    c = cos[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)
