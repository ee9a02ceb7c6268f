"""Storage for a model built on the meta device (every DiT build starts there, see dit.py `meta_dit`).

`nn.Module.to_empty` allocates each tensor with `torch.empty_like(meta_tensor, device=...)`. For a meta input
that call runs torch's Python reference of empty_like, which imports torch.fx's symbolic shapes and with them
sympy (0.3-0.4 s, a third of a one-process generation's start-up) only to work out the stride order.
`allocate` makes the same call that `to_empty` makes, through the same `Module._apply`, with the strides
read from the meta tensor: `torch.empty_strided` is a plain allocation, so the result is the same tensors
(shape, dtype, strides, uninitialised) without that import.
"""

from __future__ import annotations

import torch
from torch import nn


def allocate(model: nn.Module, device) -> nn.Module:
    """`model.to_empty(device=device)`: every parameter and buffer uninitialised on `device`, same strides."""
    device = torch.device(device)
    # _apply is the method to_empty itself goes through; it replaces parameters and buffers alike.
    return model._apply(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device))
