"""Tensor parallelism: the sequence-parallel collectives over the tensor-parallel group (dim 0 = tokens),
written with plain torch.distributed calls so the same code runs on gloo (CPU) and NCCL, and the
tensor-parallel linears that `parallelize_dit` puts in the layer spec's linear slots."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from magi_train.mcore import (ColumnParallelLinear, ModelParallelConfig, RowParallelLinear,
                               copy_to_tensor_model_parallel_region)
from magi_train.model.linear import XATTN_KV_ROW_BLOCKS, blocked_product, cast_for_compute


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((dist.get_world_size(group) * x.shape[0],) + tuple(x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // dist.get_world_size(group),) + tuple(x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group), None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group), None


def sp_gather(x: torch.Tensor, group) -> torch.Tensor:
    """(S/tp, ...) -> (S, ...) before a column-parallel linear; the backward sums the ranks' input grads."""
    return _Gather.apply(x, group)


def sp_reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    """Partial sums (S, ...) of a row-parallel linear -> this rank's tokens (S/tp, ...), summed."""
    return _ReduceScatter.apply(x, group)


# ---------------------------------------------------------------------------- tensor-parallel linears
# megatron-core's ColumnParallelLinear / RowParallelLinear with the adaptations of the single-process
# linears (magi_train/model/linear.py: no `_extra_state`, `compute_dtype`, explicit autocast casts), and
# sequence parallel done with `sp_gather` / `sp_reduce_scatter` above (megatron's own SP path allocates with
# `torch.cuda.current_device()` and cannot run on CPU): megatron's layers run with SP off, the column layer's
# internal input-gradient all-reduce disabled (the gather's backward reduce-scatters instead). They take the
# global sizes and return one tensor (no deferred bias add). `parallelize_dit` puts them in the spec's slots.


class _MagiLinear:
    # megatron's layers report an empty `_extra_state` (for TE compatibility) and add one on load; the
    # official checkpoint has none, so fall back to nn.Module's behaviour.
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def _drop_extra_state_hook(self) -> None:
        self._load_state_dict_pre_hooks.clear()

    def _forward_impl(self, input, weight, *args, **kwargs):
        # megatron's autograd function re-enters autocast only for CUDA in its backward; with CPU autocast
        # the backward would mix dtypes. Casting explicitly and running without autocast works on both.
        input, weight = cast_for_compute(input, weight, self.compute_dtype)
        if kwargs.get("bias") is not None and input.dtype != kwargs["bias"].dtype:
            kwargs["bias"] = kwargs["bias"].to(input.dtype)
        with torch.autocast(input.device.type, enabled=False):
            return super()._forward_impl(input, weight, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class ColumnLinear(_MagiLinear, ColumnParallelLinear):
    """Output features split across the TP group; input replicated (or gathered along S)."""

    def __init__(self, input_size: int, output_size: int, *, config: ModelParallelConfig, init_method, bias: bool = False,
                 tp_group: Optional[dist.ProcessGroup] = None, compute_dtype: Optional[torch.dtype] = None,
                 sequence_parallel: bool = False):
        super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias, tp_group=tp_group,
                         disable_grad_reduce=sequence_parallel)
        self.compute_dtype = compute_dtype
        self.sp = sequence_parallel and self.tp_group is not None and self.tp_group.size() > 1
        self._drop_extra_state_hook()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sp:
            x = sp_gather(x, self.tp_group)
        return super().forward(x)


class RowLinear(_MagiLinear, RowParallelLinear):
    """Input features split across the TP group; output all-reduced (or reduce-scattered along S)."""

    def __init__(self, input_size: int, output_size: int, *, config: ModelParallelConfig, init_method, bias: bool = False,
                 tp_group: Optional[dist.ProcessGroup] = None, compute_dtype: Optional[torch.dtype] = None,
                 sequence_parallel: bool = False):
        super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias,
                         input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
        self.compute_dtype = compute_dtype
        self.sp = sequence_parallel and self.tp_group is not None and self.tp_group.size() > 1
        self._drop_extra_state_hook()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sp:
            return super().forward(x)
        # megatron's forward minus its reduction, which becomes a reduce-scatter over the sequence.
        partial = self._forward_impl(
            input=x, weight=self.weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
            sequence_parallel=False, tp_group=None, grad_output_buffer=None,
        )
        return sp_reduce_scatter(partial, self.tp_group)


class CaptionKVColumnLinear(ColumnLinear):
    """`linear_kv_xattn` on a TP rank: its KV heads' rows, multiplied as XATTN_KV_ROW_BLOCKS / tp row blocks
    (the released TP layout's rounding). Captions are not split by token (no sequence parallel here).

    `reduce_grad`: the caption input is replicated over the TP group and its gradient summed over it here
    (megatron's convention); under sequence parallel it is left partial per TP rank like every other
    replicated input (summed with the other partial gradients after backward)."""

    def __init__(self, input_size: int, output_size: int, *, reduce_grad: bool, **kwargs):
        super().__init__(input_size, output_size, sequence_parallel=False, **kwargs)
        self.reduce_grad = reduce_grad
        # From the group given (megatron keeps None for it where torch.distributed is not initialised).
        self.row_blocks = max(1, XATTN_KV_ROW_BLOCKS // kwargs["tp_group"].size())

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.reduce_grad:
            y = copy_to_tensor_model_parallel_region(y, group=self.tp_group)
        return blocked_product(y, self.weight, self.row_blocks)
