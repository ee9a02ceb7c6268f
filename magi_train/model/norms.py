"""The two LayerNorm flavours of MAGI-1 (both matter for loading released weights), and their kernel.

- Pre-norms (`linear_qkv.layer_norm`, `mlp.layer_norm`) are plain LayerNorms (`PlainLayerNorm`, an
  `nn.LayerNorm`): gamma used as stored.
- Every other norm (QK-norms, sandwich post-norms, final norm) is "1p": the stored gamma is zero-centred and
  `gamma + 1` is applied. The `+ 1` happens in the parameter's dtype, so for bf16 parameters the rounding
  happens there, exactly as in the released code.

The kernel (`model.fused_norms`, set on a built model by `select_fused_norms`): torch's `F.layer_norm`
everywhere by default, and on CUDA tensors NVIDIA apex's fused LayerNorm where apex imports. Both get the same
operands: the `+ 1` above is done first, in the parameter's dtype, and under autocast apex is given fp32 operands
and returns fp32, as torch's autocast does for layer_norm (an op on its fp32 list). Apex's affine kernel takes
one dtype for input and parameters; a mix (bf16 activations into fp32 norms without autocast) stays on torch's
path, which is then what ran before. The CPU never leaves torch's path, so CPU results are unchanged bit for bit.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

# model.fused_norms
FUSED_NORMS = ("auto", "torch", "apex")

# fused(x, weight, bias, normalized_shape, eps) -> y: apex's `fused_layer_norm_affine` signature.
FusedLayerNorm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tuple, float], torch.Tensor]


def apex_layer_norm() -> Optional[FusedLayerNorm]:
    """apex's fused affine LayerNorm, or None where NVIDIA apex (built with its CUDA extensions) does not import.
    (PyPI's `apex` is an unrelated package without `apex.normalization`: None there too.)"""
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine
    except Exception:  # ImportError, or a build without its CUDA extension (OSError/RuntimeError at import)
        return None
    return fused_layer_norm_affine


def _on_cuda(x: torch.Tensor) -> bool:
    return x.is_cuda


def _fused(fused: FusedLayerNorm, x, size, weight, bias, eps) -> Optional[torch.Tensor]:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # torch's autocast runs layer_norm in fp32 whatever its inputs; give apex the same fp32 operands.
        x, weight, bias = x.float(), weight.float(), bias.float()
    if not x.dtype == weight.dtype == bias.dtype:
        return None  # apex's affine kernel takes one dtype: torch's path handles the mix
    with torch.autocast(device, enabled=False):  # apex would otherwise cast its operands to the autocast dtype
        return fused(x, weight, bias, size, eps)


def layer_norm(x: torch.Tensor, size, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
               fused: Optional[FusedLayerNorm]) -> torch.Tensor:
    """`F.layer_norm(x, size, weight, bias, eps)`, by apex's kernel `fused` when given and x is on CUDA."""
    if fused is not None and weight is not None and bias is not None and _on_cuda(x):
        out = _fused(fused, x, size, weight, bias, eps)
        if out is not None:
            return out
    return F.layer_norm(x, size, weight, bias, eps)


class LayerNorm1p(nn.Module):
    def __init__(self, size: int, eps: float, apply_1p: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.size = (size,)
        self.eps = eps
        self.apply_1p = apply_1p
        # Zero-centred gamma: 0 means identity scale when apply_1p.
        self.weight = nn.Parameter(torch.zeros(size, dtype=dtype) if apply_1p else torch.ones(size, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(size, dtype=dtype))
        self.fused: Optional[FusedLayerNorm] = None  # set by select_fused_norms

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The constructor's values again (a model materialised from the meta device starts here)."""
        self.weight.fill_(0.0 if self.apply_1p else 1.0)
        self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.apply_1p else self.weight
        return layer_norm(x, self.size, weight, self.bias, self.eps, self.fused)


class PlainLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` (same parameters, same torch computation) whose kernel `select_fused_norms` can set."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused: Optional[FusedLayerNorm] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, self.fused)


def plain_layer_norm(size: int, eps: float, dtype: torch.dtype) -> nn.LayerNorm:
    return PlainLayerNorm(size, eps=eps, dtype=dtype)


def select_fused_norms(model: nn.Module, mode: str, compiled: bool = False) -> int:
    """Set the kernel of every norm of `model` for `model.fused_norms=mode`; returns how many norms take apex's
    kernel on CUDA (0: torch's everywhere).

    auto: apex's where it imports, except under `compiled` (trainer.compile): inductor fuses torch's norm into the
    layer's kernels, and apex's extension would split each compiled region at every norm. torch: torch's.
    apex: apex's, or a RuntimeError here where it does not import."""
    if mode not in FUSED_NORMS:
        raise ValueError(f"model.fused_norms={mode!r} is not one of {list(FUSED_NORMS)}")
    fused = None
    if mode == "apex" or (mode == "auto" and not compiled):
        fused = apex_layer_norm()
    if mode == "apex" and fused is None:
        raise RuntimeError("model.fused_norms=apex needs NVIDIA apex built with its CUDA extensions "
                           "(apex.normalization.fused_layer_norm does not import here; it is built from "
                           "github.com/NVIDIA/apex, not PyPI's `apex`). Use model.fused_norms=auto or torch.")
    norms = [m for m in model.modules() if isinstance(m, (LayerNorm1p, PlainLayerNorm))]
    for norm in norms:
        norm.fused = fused
    return len(norms) if fused is not None else 0
