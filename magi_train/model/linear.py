"""Tensor-parallel linears of the DiT, on megatron-core's ColumnParallelLinear / RowParallelLinear.

Adaptations (the first two about the released checkpoint):
- Their state dict carries no `_extra_state` entries, so our keys equal the official MAGI-1 keys one for one.
- `compute_dtype`: MAGI-1 computes `linear_proj` in fp32 from bf16 weights and activations (CUDA fp32
  autocast in the released code). Casting inside `_forward_impl` keeps megatron's TP communication intact.
- Under autocast (bf16 training) they cast explicitly to the autocast dtype (see `_linear`).
- Sequence parallel is done here with `sp_gather` / `sp_reduce_scatter` (megatron's own SP path allocates
  with `torch.cuda.current_device()` and cannot run on CPU); megatron's layers run with SP off, the
  column layer's internal input-gradient all-reduce disabled (the gather's backward reduce-scatters instead).
They return one tensor (these layers never use megatron's deferred bias add).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from torch import nn

from magi_train.parallel.tensor import sp_gather, sp_reduce_scatter


class _MagiLinear:
    # megatron's layers report an empty `_extra_state` (for TE compatibility) and add one on load; the
    # official checkpoint has none, so fall back to nn.Module's behaviour.
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def _drop_extra_state_hook(self) -> None:
        self._load_state_dict_pre_hooks.clear()

    def _cast(self, input, weight, kwargs):
        device = input.device.type
        target = self.compute_dtype
        if target is None and torch.is_autocast_enabled(device):
            target = torch.get_autocast_dtype(device)
        if target is not None:
            input = input.to(target)
            weight = weight.to(target)
            if kwargs.get("bias") is not None:
                kwargs["bias"] = kwargs["bias"].to(target)
        return input, weight, kwargs

    def _forward_impl(self, input, weight, *args, **kwargs):
        # megatron's autograd function re-enters autocast only for CUDA in its backward; with CPU autocast
        # the backward would mix dtypes. Casting explicitly and running without autocast works on both.
        input, weight, kwargs = self._cast(input, weight, kwargs)
        with torch.autocast(input.device.type, enabled=False):
            return super()._forward_impl(input, weight, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class ColumnLinear(_MagiLinear, ColumnParallelLinear):
    """Output features split across the TP group; input replicated."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ModelParallelConfig,
        init_method,
        bias: bool = False,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
        compute_dtype: Optional[torch.dtype] = None,
        sequence_parallel: bool = False,
    ):
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
    """Input features split across the TP group; output all-reduced."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ModelParallelConfig,
        init_method,
        bias: bool = False,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
        compute_dtype: Optional[torch.dtype] = None,
        sequence_parallel: bool = False,
    ):
        super().__init__(
            input_size,
            output_size,
            config=config,
            init_method=init_method,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=tp_group,
        )
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
