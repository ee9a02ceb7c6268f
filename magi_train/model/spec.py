"""Layer specs: which classes build the DiT's linears and attention kernel.

The model file names roles ("a column-parallel linear", "the core attention"), never implementations.
`local` uses megatron-core's tensor-parallel layers and the exact torch attention kernels (CPU, or GPU
without extras); a Transformer Engine spec plugs in here later without touching the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from magi_train.model.attention import ATTENTION_BACKENDS
from magi_train.model.linear import ColumnLinear, RowLinear


@dataclass(frozen=True)
class DiTLayerSpec:
    column_linear: type
    row_linear: type
    core_attention: Callable  # (q, k, v, AttnRanges) -> out


@dataclass
class LinearFactory:
    """Builds the spec's linears with the shared megatron config, init and TP group."""

    spec: DiTLayerSpec
    config: ModelParallelConfig
    init_method: Callable[[torch.Tensor], None]
    # Row-parallel layers are the residual-branch outputs here (linear_proj, linear_fc2): depth-scaled init.
    output_init_method: Callable[[torch.Tensor], None]
    tp_group: Optional[torch.distributed.ProcessGroup]
    # Activations entering column layers / leaving row layers are split over the tp ranks by token.
    sequence_parallel: bool = False

    def column(self, in_features: int, out_features: int, compute_dtype: Optional[torch.dtype] = None,
               sequence_parallel: Optional[bool] = None) -> nn.Module:
        sp = self.sequence_parallel if sequence_parallel is None else sequence_parallel
        return self.spec.column_linear(
            in_features, out_features, config=self.config, init_method=self.init_method,
            bias=False, tp_group=self.tp_group, compute_dtype=compute_dtype, sequence_parallel=sp,
        )

    def row(self, in_features: int, out_features: int, compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
        return self.spec.row_linear(
            in_features, out_features, config=self.config, init_method=self.output_init_method,
            bias=False, tp_group=self.tp_group, compute_dtype=compute_dtype, sequence_parallel=self.sequence_parallel,
        )

    @property
    def tp_size(self) -> int:
        return 1 if self.tp_group is None else self.tp_group.size()


# GPU kernels, loaded only when named: their packages exist only on CUDA machines.
GPU_ATTENTION_BACKENDS = ("magi",)


def get_attention_backend(name: str):
    """The core-attention function `model.attention_backend` names: (q, k, v, AttnRanges) -> out."""
    if name == "magi":
        from magi_train.model.magi_attention import magi_backend

        return magi_backend()  # ValueError naming model.attention_backend where MagiAttention cannot run
    try:
        return ATTENTION_BACKENDS[name]
    except KeyError:
        names = sorted([*ATTENTION_BACKENDS, *GPU_ATTENTION_BACKENDS])
        raise ValueError(f"model.attention_backend={name!r} is not one of {names}") from None


def local_spec(attention_backend: str = "torch") -> DiTLayerSpec:
    return DiTLayerSpec(column_linear=ColumnLinear, row_linear=RowLinear, core_attention=get_attention_backend(attention_backend))


def get_layer_spec(name: str, attention_backend: str) -> DiTLayerSpec:
    if name == "local":
        return local_spec(attention_backend)
    if name == "te":
        # Imported here: Transformer Engine loads only when asked for.
        from magi_train.model import te_spec

        reason = te_spec.te_unavailable_reason()
        if reason is not None:
            raise RuntimeError(
                f"model.layer_spec='te' needs Transformer Engine on a CUDA GPU, which is not usable here: {reason}. "
                f"Use model.layer_spec=local on CPU."
            )
        column, row = te_spec.te_linear_classes()
        return DiTLayerSpec(column_linear=column, row_linear=row, core_attention=get_attention_backend(attention_backend))
    raise ValueError(f"model.layer_spec={name!r} is not one of ['local', 'te']")


def megatron_config(params_dtype: torch.dtype, tp_size: int, init: bool) -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size,
        params_dtype=params_dtype,
        # The DiT initialises its sharded weights itself, from full-size tensors drawn in a fixed order
        # (see VideoDiT._init_weights): the same model for every TP size, including the SwiGLU [gate | up]
        # and replicated-KV layouts that megatron's contiguous master-weight split would get wrong.
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
    )


def scaled_init_std(std: float, num_layers: int) -> float:
    # GPT-2 / megatron: residual-branch outputs scaled by 1/sqrt(2L) keep the stream's variance bounded.
    return std / math.sqrt(2.0 * num_layers)
