"""Layer specs: which classes fill the slots of a DiT layer (megatron-core's `ModuleSpec` idea).

A layer is a tree of slots (dit.py `transformer_layer_spec` draws it):

    TransformerLayer
      ada_modulate_layer
      self_attention: SelfCrossAttention
        linear_qkv: pre_norm, q, qx, k, v          (one pre-norm shared by both attentions)
        linear_kv_xattn, linear_proj
        q_layernorm, k_layernorm, q_layernorm_xattn, k_layernorm_xattn
        core_attention (self), core_cross_attention
      self_attn_post_norm, mlp (pre_norm, linear_fc1, linear_fc2), mlp_post_norm

The model file names roles ("a linear", "the core attention"), never implementations. `LayerImpl` says what
fills the leaf slots: `local` uses the single-process linears of linear.py and the exact torch attention
kernels; `te` uses Transformer Engine's linears (GPU). Parallelism is not chosen here: `parallelize_dit`
swaps the linear slots for tensor-parallel classes and the self-attention slot for MagiAttention's
distributed attention, the same way for either spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Optional

import torch
from torch import nn

from magi_train.model.attention import ATTENTION_BACKENDS, SDPA_MAX_MASK_ELEMENTS
from magi_train.model.linear import CaptionKVLinear, Linear
from magi_train.model.norms import LayerNorm1p, plain_layer_norm

if TYPE_CHECKING:
    from magi_train.mcore import ModelParallelConfig


@dataclass(frozen=True)
class ModuleSpec:
    """A slot's implementation: `module(*args, **params, [submodules=...], **kwargs)`."""

    module: Callable[..., nn.Module]
    params: Mapping[str, Any] = field(default_factory=dict)
    submodules: Optional[Any] = None  # a dataclass of the slot's own slots, for composite modules


def build_module(spec, *args, **kwargs) -> nn.Module:
    """Build a slot from a `ModuleSpec` (or a bare class/factory)."""
    if not isinstance(spec, ModuleSpec):
        spec = ModuleSpec(spec)
    extra = {} if spec.submodules is None else {"submodules": spec.submodules}
    return spec.module(*args, **spec.params, **extra, **kwargs)


class CoreAttention(nn.Module):
    """The attention kernel slot: (q, k, v, AttnRanges) -> out, no parameters (no state-dict keys)."""

    def __init__(self, kernel: Callable):
        super().__init__()
        self.kernel = kernel

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ranges) -> torch.Tensor:
        return self.kernel(q, k, v, ranges)

    def extra_repr(self) -> str:
        return getattr(self.kernel, "__name__", repr(self.kernel))


@dataclass(frozen=True)
class LayerImpl:
    """What fills the leaf slots of every layer (see the module docstring)."""

    name: str  # model.layer_spec
    # The q/qx/k/v/fc1 (column) and proj/fc2 (row) linears: the roles tensor parallelism gives them; on one
    # process both compute x Wᵀ.
    column_linear: Callable
    row_linear: Callable
    caption_linear: Callable  # linear_kv_xattn (row-blocked product)
    core_attention: ModuleSpec
    pre_norm: Callable = plain_layer_norm  # (size, eps, dtype)
    norm: Callable = LayerNorm1p  # the "1p" QK/post norms: (size, eps, apply_1p, dtype)


# Kernels loaded only when named: flex (model/flex.py) imports torch's compiler stack, flash-attn's and
# MagiAttention's packages exist only on CUDA machines; auto picks one of the others per call.
ON_DEMAND_ATTENTION_BACKENDS = ("flex", "flash", "magi", "auto")


def _magi_runs(device: torch.device) -> bool:
    from magi_train.model.magi_attention import magi_attention_available

    with torch.cuda.device(device.index):
        return magi_attention_available()


def _flash_runs(device: torch.device) -> bool:
    from magi_train.model.flash import flash_attention_available

    with torch.cuda.device(device.index):
        return flash_attention_available()


def auto_backend_name(device: torch.device, total_q: int, total_k: int, dtype: Optional[torch.dtype] = None,
                      ranges=None) -> str:
    """`model.attention_backend=auto` for a call on `device`, best first: MagiAttention > flash-attn > flex >
    sdpa > torch, each where it runs.

    On CUDA: magi where it runs (Hopper, its package) and flash where flash-attn 2 runs (Ampere or newer, its
    package), both for bf16/fp16 inputs only (`dtype`; None: assumed bf16) and flash only while its gathered
    key copy is no larger than the keys (`flash.gather_fits(ranges, total_k)`, skipped without `ranges`: the
    copy is 8.5 x the keys for 16 block-causal chunks, see model/flash.py); else flex, compiled and memory
    bounded. Elsewhere sdpa (one masked call) while its dense mask fits its limit, else torch (per range,
    memory bounded). The flex CPU path is eager and scores densely, so it is never the CPU's choice."""
    if device.type == "cuda":
        half = dtype is None or dtype in (torch.bfloat16, torch.float16)
        if half and _magi_runs(device):
            return "magi"
        if half and _flash_runs(device):
            from magi_train.model.flash import gather_fits

            if ranges is None or gather_fits(ranges, total_k):
                return "flash"
        return "flex"
    return "sdpa" if total_q * total_k <= SDPA_MAX_MASK_ELEMENTS else "torch"


def auto_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ranges) -> torch.Tensor:
    """The kernel `auto_backend_name` picks for these tensors; same contract as every backend. The choice is
    made once per ranges object (every layer of a forward shares it), not once per layer."""
    tq, tk = q.shape[0], k.shape[0]
    name = ranges.memo(("auto", str(q.device), q.dtype, tq, tk),
                       lambda: auto_backend_name(q.device, tq, tk, q.dtype, ranges))
    return get_attention_backend(name)(q, k, v, ranges)


def available_backends(device: torch.device) -> List[str]:
    """The `model.attention_backend` names that run on `device`, in auto's order of preference (for
    benchmarks that try each). magi and flash take bf16/fp16 only; on the CPU flex runs eagerly, forward
    only (torch has no CPU flex backward), so it comes last there."""
    device = torch.device(device)
    if device.type == "cuda":
        found = [name for name, runs in (("magi", _magi_runs), ("flash", _flash_runs)) if runs(device)]
        return [*found, "flex", "sdpa", "torch"]
    return ["sdpa", "torch", "flex"]


def get_attention_backend(name: str):
    """The core-attention function `model.attention_backend` names: (q, k, v, AttnRanges) -> out."""
    if name == "magi":
        from magi_train.model.magi_attention import magi_backend

        return magi_backend()  # ValueError naming model.attention_backend where MagiAttention cannot run
    if name == "flash":
        from magi_train.model.flash import flash_backend

        return flash_backend()  # ValueError naming model.attention_backend where flash-attn cannot run
    if name == "flex":
        from magi_train.model.flex import flex_range_attention

        return flex_range_attention
    if name == "auto":
        return auto_attention
    try:
        return ATTENTION_BACKENDS[name]
    except KeyError:
        names = sorted([*ATTENTION_BACKENDS, *ON_DEMAND_ATTENTION_BACKENDS])
        raise ValueError(f"model.attention_backend={name!r} is not one of {names}") from None


def local_spec(attention_backend: str = "torch") -> LayerImpl:
    core = ModuleSpec(CoreAttention, {"kernel": get_attention_backend(attention_backend)})
    return LayerImpl("local", Linear, Linear, CaptionKVLinear, core)


def get_layer_spec(name: str, attention_backend: str) -> LayerImpl:
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
        core = ModuleSpec(CoreAttention, {"kernel": get_attention_backend(attention_backend)})
        return LayerImpl("te", column, row, CaptionKVLinear, core)
    raise ValueError(f"model.layer_spec={name!r} is not one of ['local', 'te']")


@dataclass(frozen=True)
class LinearConfig:
    """What a single-process linear slot (linear.py's, or TE's without a tp_group) reads from its `config`:
    the fields of `megatron_config(params_dtype, 1)` they use, with the same values. Building the model
    through it rather than megatron's ModelParallelConfig keeps megatron-core (1 s of imports: DTensor,
    sympy, its DDP) out of single-process inference; tensor parallelism builds megatron's own config."""

    params_dtype: torch.dtype
    sequence_parallel: bool = False
    perform_initialization: bool = False  # VideoDiT.init_weights draws the weights (see megatron_config)


def megatron_config(params_dtype: torch.dtype, tp_size: int, init: bool = False) -> ModelParallelConfig:
    """megatron-core's config for its tensor-parallel linears (magi_train/parallel/tensor.py)."""
    from magi_train.mcore import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size,
        params_dtype=params_dtype,
        # The DiT initialises its sharded weights itself, from full-size tensors drawn in a fixed order
        # (see VideoDiT.init_weights): the same model for every TP size, including the SwiGLU [gate | up]
        # and replicated-KV layouts that megatron's contiguous master-weight split would get wrong.
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
    )


def scaled_init_std(std: float, num_layers: int) -> float:
    # GPT-2 / megatron: residual-branch outputs scaled by 1/sqrt(2L) keep the stream's variance bounded.
    return std / math.sqrt(2.0 * num_layers)


# The slots of one layer (dit.py's transformer_layer_spec fills them from a LayerImpl).
@dataclass(frozen=True)
class AttentionSubmodules:
    pre_norm: object
    column_linear: object  # q, qx, k, v
    caption_linear: object  # linear_kv_xattn
    row_linear: object  # linear_proj
    norm: object  # the four QK-norms
    core_attention: object  # self-attention kernel (MagiAttention's distributed attention under its cp)
    core_cross_attention: object


@dataclass(frozen=True)
class MLPSubmodules:
    pre_norm: object
    column_linear: object  # linear_fc1
    row_linear: object  # linear_fc2


@dataclass(frozen=True)
class LayerSubmodules:
    self_attention: ModuleSpec
    mlp: ModuleSpec
    post_norm: object  # self_attn_post_norm, mlp_post_norm
