"""The DiT's single-process linears (the `local` layer spec).

They compute exactly what megatron-core's ColumnParallelLinear / RowParallelLinear compute on one rank (the
same autograd function, `linear_with_grad_accumulation_and_async_allreduce`, with every communication off), so
a model built with them and a tensor-parallel model built by `parallelize_dit` round the same way. They hold
no process group: tensor parallelism swaps them for the sharded classes of magi_train/parallel/tensor.py.

Adaptations (the first two about the released checkpoint):
- The state dict holds `weight` only (no `_extra_state`): our keys equal the official MAGI-1 keys one for one.
- `compute_dtype`: MAGI-1 computes `linear_proj` in fp32 from bf16 weights and activations (CUDA fp32
  autocast in the released code); see `cast_for_compute`.
- Under autocast (bf16 training) they cast explicitly to the autocast dtype and run the product with
  autocast off (megatron's autograd function re-enters autocast only for CUDA in its backward; with CPU
  autocast the backward would mix dtypes).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import nn


def cast_for_compute(x: torch.Tensor, weight: torch.Tensor, compute_dtype: Optional[torch.dtype]
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x, weight) in the dtype the product runs in: `compute_dtype`, else autocast's, else unchanged."""
    device = x.device.type
    target = compute_dtype
    if target is None and torch.is_autocast_enabled(device):
        target = torch.get_autocast_dtype(device)
    if target is not None:
        x, weight = x.to(target), weight.to(target)
    return x, weight


def local_matmul(x: torch.Tensor, weight: torch.Tensor, compute_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """x @ weightᵀ through megatron's linear autograd function with no communication.

    Where no gradient is recorded (inference, evaluation) the product is `torch.matmul(x, weight.t())`, the very
    call that function's forward makes with communication off: the same numbers, without importing megatron-core
    (1 s of imports) into a process that only runs the model."""
    x, weight = cast_for_compute(x, weight, compute_dtype)
    with torch.autocast(x.device.type, enabled=False):
        if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            return torch.matmul(x, weight.t())
        from magi_train.mcore import linear_with_grad_accumulation_and_async_allreduce

        return linear_with_grad_accumulation_and_async_allreduce(
            x, weight, None, gradient_accumulation_fusion=False, allreduce_dgrad=False, sequence_parallel=False)


class Linear(nn.Module):
    """y = x Wᵀ (no bias), W of shape (out, in) in `config.params_dtype`.

    The constructor takes the layer-spec contract shared with the TE linears (global sizes, `config`,
    `init_method`, `tp_group`, `compute_dtype`, `sequence_parallel`; of `config`, spec.py's LinearConfig or
    megatron's ModelParallelConfig, only `params_dtype` is read); a single-process layer accepts only
    `tp_group=None` and `sequence_parallel=False`. Weights are drawn by `VideoDiT.init_weights`."""

    def __init__(self, input_size: int, output_size: int, *, config: Any, init_method=None,
                 bias: bool = False, tp_group=None, compute_dtype: Optional[torch.dtype] = None,
                 sequence_parallel: bool = False):
        super().__init__()
        if bias or tp_group is not None or sequence_parallel:
            raise ValueError("model.linear.Linear is the single-process linear (no bias, no tp_group, no sequence "
                             "parallel): tensor parallelism is applied by magi_train.parallel.parallelize_dit")
        self.input_size, self.output_size = input_size, output_size
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_matmul(x, self.weight, self.compute_dtype)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, compute_dtype={self.compute_dtype}"


# The released model multiplies caption tokens by `linear_kv_xattn` as 8 row blocks; the result is the
# same matrix product, but the blocking changes fp32 rounding, and we reproduce it bit for bit. A tensor-
# parallel rank holds 1/tp of the rows and multiplies them as 8/tp blocks (the released TP layout).
XATTN_KV_ROW_BLOCKS = 8


def blocked_product(y: torch.Tensor, weight: torch.Tensor, row_blocks: int) -> torch.Tensor:
    """y @ weightᵀ computed as `row_blocks` products of row blocks of weight, concatenated."""
    return torch.cat([torch.matmul(y, w.t()) for w in torch.chunk(weight, row_blocks, dim=0)], dim=1)


class _GradSum(torch.autograd.Function):
    """Identity whose backward is one node: the gradients of a layer's row blocks are summed here before
    they join the other layers' (the order of the tensor-parallel path, whose caption input passes one
    such node, so every layout rounds the caption gradient alike)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def grad_sum_node(x: torch.Tensor) -> torch.Tensor:
    return _GradSum.apply(x)


class CaptionKVLinear(Linear):
    """Cross-attention keys and values of the caption tokens (`linear_kv_xattn`), as `XATTN_KV_ROW_BLOCKS`
    row-block products (see above). Rows are interleaved per KV head: [K_0 | V_0 | K_1 | V_1 | ...]."""

    row_blocks = XATTN_KV_ROW_BLOCKS

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return blocked_product(grad_sum_node(y), self.weight, self.row_blocks)
