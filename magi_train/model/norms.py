"""The two LayerNorm flavours of MAGI-1 (both matter for loading released weights).

- Pre-norms (`linear_qkv.layer_norm`, `mlp.layer_norm`) are plain `torch.nn.LayerNorm`: gamma used as stored.
- Every other norm (QK-norms, sandwich post-norms, final norm) is "1p": the stored gamma is zero-centred and
  `gamma + 1` is applied. The `+ 1` happens in the parameter's dtype, so for bf16 parameters the rounding
  happens there, exactly as in the released code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm1p(nn.Module):
    def __init__(self, size: int, eps: float, apply_1p: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.size = (size,)
        self.eps = eps
        self.apply_1p = apply_1p
        # Zero-centred gamma: 0 means identity scale when apply_1p.
        self.weight = nn.Parameter(torch.zeros(size, dtype=dtype) if apply_1p else torch.ones(size, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(size, dtype=dtype))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The constructor's values again (a model materialised from the meta device starts here)."""
        self.weight.fill_(0.0 if self.apply_1p else 1.0)
        self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.apply_1p else self.weight
        return F.layer_norm(x, self.size, weight, self.bias, self.eps)


def plain_layer_norm(size: int, eps: float, dtype: torch.dtype) -> nn.LayerNorm:
    return nn.LayerNorm(size, eps=eps, dtype=dtype)
