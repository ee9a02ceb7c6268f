"""One MAGI-1 transformer layer, written for a single process.

    g          = softcap(Linear(SiLU(c)), 1)           per-chunk gates, (N, dn, 2H)
    h          = LayerNorm_pre(x)                      one plain pre-norm shared by both attentions
    a_self     = SelfAttn(RoPE(LN1p q), RoPE(LN1p k), v)   over AttnRanges (block-causal, KV cache)
    a_cross    = CrossAttn(LN1p qx, LN1p kx, vx)           each chunk to its own caption row
    x          = x + LN1p_post(Linear_proj(interleave(a_self, a_cross)) * g_attn)   gate BEFORE post-norm
    x          = x + LN1p_post(MLP(LayerNorm_pre(x)) * g_mlp)

Written for one process. The slots (linears, norms, core attention) are filled from a layer spec (spec.py);
`parallelize_dit` swaps the linears for tensor-parallel ones (heads split over the TP group) and sets the
model's token layout (layout.py), which self-attention calls around its core kernel. The residual stream is
(S, N, H), sequence-first.
Rounding points (casts to `dtype`) follow the released model so that its checkpoints reproduce exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from magi_train.config.schema import ModelConfig
from magi_train.model.attention import AttnRanges
from magi_train.model.layout import LocalPlacement
from magi_train.model.rope import apply_rotary
from magi_train.model.spec import LayerImpl, ModuleSpec, build_module, megatron_config

# A hook that merges the current keys/values with cached ones: (layer, k, v) -> (k_all, v_all).
KVHook = Callable[[int, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


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


def transformer_layer_spec(impl: LayerImpl) -> ModuleSpec:
    """The slot tree of one layer, filled from `impl` (see spec.py)."""
    attention = ModuleSpec(SelfCrossAttention, submodules=AttentionSubmodules(
        impl.pre_norm, impl.column_linear, impl.caption_linear, impl.row_linear, impl.norm,
        impl.core_attention, impl.core_attention))
    mlp = ModuleSpec(MLP, submodules=MLPSubmodules(impl.pre_norm, impl.column_linear, impl.row_linear))
    return ModuleSpec(TransformerLayer, submodules=LayerSubmodules(attention, mlp, impl.norm))


def _skip_init(_: torch.Tensor) -> None:
    """megatron's init hook; unused because VideoDiT.init_weights draws full-size weights itself."""


def build_linear(spec, in_features: int, out_features: int, dtype: torch.dtype,
                 compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A single-process linear slot (global sizes, no process group)."""
    return build_module(spec, in_features, out_features, config=megatron_config(dtype, 1), init_method=_skip_init,
                        bias=False, tp_group=None, compute_dtype=compute_dtype, sequence_parallel=False)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return (cap * torch.tanh(x.float() / cap)).to(x.dtype)


def modulate_add(branch: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor, condition_map: torch.Tensor, post_norm: nn.Module) -> torch.Tensor:
    """residual + post_norm(branch * gate[chunk of token]) in fp32, cast back to the branch dtype."""
    dtype = branch.dtype
    token_gate = gate.float().flatten(0, 1)[condition_map]  # (S, N, H)
    out = post_norm(branch.float() * token_gate) + residual.float()
    return out.to(dtype)


class AdaModulate(nn.Module):
    def __init__(self, cond_size: int, gate_size: int, dtype: torch.dtype):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(cond_size, 2 * gate_size, bias=True, dtype=dtype))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(c))


class LayerNormQKV(nn.Module):
    """The shared pre-norm and the four projections (self q/k/v and cross-attention qx)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, sub: AttentionSubmodules):
        super().__init__()
        H = cfg.hidden_size
        q_size = cfg.num_attention_heads * cfg.kv_channels
        kv_size = cfg.num_query_groups * cfg.kv_channels
        self.layer_norm = build_module(sub.pre_norm, H, cfg.layernorm_epsilon, dtype)
        self.q = build_linear(sub.column_linear, H, q_size, dtype)
        self.qx = build_linear(sub.column_linear, H, q_size, dtype)
        self.k = build_linear(sub.column_linear, H, kv_size, dtype)
        self.v = build_linear(sub.column_linear, H, kv_size, dtype)


class SelfCrossAttention(nn.Module):
    """Self-attention and caption cross-attention from one pre-norm, projected by one linear_proj.

    (Not "parallel" in the tensor-parallel sense: the two attentions run side by side on the same input.)"""

    def __init__(self, cfg: ModelConfig, layer_index: int, dtype: torch.dtype, submodules: AttentionSubmodules):
        super().__init__()
        sub = submodules
        self.layer_index = layer_index
        self.head_dim = cfg.kv_channels
        # Groups of heads in linear_proj's input (the released TP8 layout); a tensor-parallel rank has
        # 1/tp of them (parallelize_dit divides it).
        self.proj_groups = cfg.proj_interleave_groups
        self.recompute_attention = False  # selective recompute: re-run the attention kernels in backward
        q_size = cfg.num_attention_heads * cfg.kv_channels

        self.linear_qkv = LayerNormQKV(cfg, dtype, sub)
        xattn_in = int(cfg.hidden_size * cfg.xattn_cond_hidden_ratio)
        self.linear_kv_xattn = build_linear(sub.caption_linear, xattn_in, 2 * cfg.num_query_groups * cfg.kv_channels, dtype)
        # Computed in fp32 from bf16 weights, as the released model does.
        self.linear_proj = build_linear(sub.row_linear, 2 * q_size, cfg.hidden_size, dtype, compute_dtype=torch.float32)
        eps, p1 = cfg.layernorm_epsilon, cfg.apply_layernorm_1p
        # Self-attention QK-norms run in fp32; the cross-attention ones in the model dtype (released layout).
        self.q_layernorm = build_module(sub.norm, cfg.kv_channels, eps, p1, torch.float32)
        self.k_layernorm = build_module(sub.norm, cfg.kv_channels, eps, p1, torch.float32)
        self.q_layernorm_xattn = build_module(sub.norm, cfg.kv_channels, eps, p1, dtype)
        self.k_layernorm_xattn = build_module(sub.norm, cfg.kv_channels, eps, p1, dtype)
        self.core_attention = build_module(sub.core_attention)
        self.core_cross_attention = build_module(sub.core_cross_attention)

    def _rope_heads(self, x: torch.Tensor, norm: nn.Module, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        # (S, N, h*d) -> QK-norm and RoPE in fp32 -> (N, S, h, d) batch-major
        S, N, _ = x.shape
        dtype = x.dtype
        x = norm(x.reshape(S, N, -1, self.head_dim).float()).transpose(0, 1)
        return apply_rotary(x, sin, cos).to(dtype)

    def _attend(self, q, k, v, ranges, kernel: Optional[nn.Module] = None):
        kernel = self.core_attention if kernel is None else kernel
        if self.recompute_attention and torch.is_grad_enabled():
            return checkpoint(kernel, q, k, v, ranges, use_reentrant=False)
        return kernel(q, k, v, ranges)

    def self_attention(self, h, sin, cos, placement, kv_hook: Optional[KVHook]) -> torch.Tensor:
        """`placement`: the forward's token placement (layout.py), or plain AttnRanges on one process."""
        S, N, _ = h.shape
        if isinstance(placement, AttnRanges):
            placement = LocalPlacement(placement, N, S)
        q = self._rope_heads(self.linear_qkv.q(h), self.q_layernorm, sin, cos)
        k = self._rope_heads(self.linear_qkv.k(h), self.k_layernorm, sin, cos)
        v = self.linear_qkv.v(h)
        S = v.shape[0]  # the context-parallel slice (sequence parallel gathered it inside the linears)
        v = v.transpose(0, 1).reshape(N, S, -1, self.head_dim)
        q, k, v = placement.to_heads(q, k, v)
        total = q.shape[1]  # every token of the chunks in this forward
        q, k, v = (t.reshape(N * total, -1, self.head_dim) for t in (q, k, v))
        if kv_hook is not None:
            k, v = kv_hook(self.layer_index, k, v)
        out = self._attend(q, k, v, placement.attn_ranges)  # (N*total, h, d)
        out = placement.from_heads(out.reshape(N, total, -1, self.head_dim))
        return out.reshape(N, S, -1).transpose(0, 1)

    def cross_attention(self, h, y_flat, ranges: AttnRanges) -> torch.Tensor:
        qx = self.linear_qkv.qx(h)
        S, N, _ = qx.shape
        qx = qx.transpose(0, 1).reshape(N * S, -1, self.head_dim)
        qx = self.q_layernorm_xattn(qx)
        kv = self.linear_kv_xattn(y_flat)
        # Rows are interleaved per KV head: [K_0 | V_0 | K_1 | V_1 | ...], 128 each.
        kv_heads = kv.shape[1] // (2 * self.head_dim)  # this rank's (from the shape: there may be no caption rows)
        kx, vx = kv.view(y_flat.shape[0], kv_heads, 2 * self.head_dim).chunk(2, dim=-1)
        kx = self.k_layernorm_xattn(kx)
        out = self._attend(qx, kx, vx.contiguous(), ranges, self.core_cross_attention)
        return out.reshape(N, S, -1).transpose(0, 1)

    def forward(self, x, sin, cos, placement, y_flat, cross_ranges, kv_hook=None) -> torch.Tensor:
        h = self.linear_qkv.layer_norm(x)
        a_self = self.self_attention(h, sin, cos, placement, kv_hook)
        a_cross = self.cross_attention(h, y_flat, cross_ranges)
        # [self heads | cross heads] -> per group of heads [self_g | cross_g] (released TP8 layout).
        mixed = torch.cat([a_self, a_cross], dim=2)
        mixed = rearrange(mixed, "s n (two g d) -> s n (g two d)", two=2, g=self.proj_groups)
        return self.linear_proj(mixed)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, submodules: MLPSubmodules):
        super().__init__()
        sub = submodules
        self.gated = cfg.gated_linear_unit
        self.layer_norm = build_module(sub.pre_norm, cfg.hidden_size, cfg.layernorm_epsilon, dtype)
        fc1_out = (2 if self.gated else 1) * cfg.ffn_hidden_size
        self.linear_fc1 = build_linear(sub.column_linear, cfg.hidden_size, fc1_out, dtype)
        self.linear_fc2 = build_linear(sub.row_linear, cfg.ffn_hidden_size, cfg.hidden_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.linear_fc1(self.layer_norm(x))
        if self.gated:
            # SwiGLU: the first half is gated (flashinfer silu_and_mul), computed in fp32, rounded once.
            a, b = u.chunk(2, dim=-1)
            u = (F.silu(a.float()) * b.float()).to(u.dtype)
        else:
            u = F.gelu(u)
        return self.linear_fc2(u)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int, dtype: torch.dtype, submodules: LayerSubmodules):
        super().__init__()
        sub = submodules
        self.dtype = dtype
        cond_size = int(cfg.hidden_size * cfg.cond_hidden_ratio)
        gate_size = int(cfg.hidden_size * cfg.cond_gating_ratio)
        eps, p1 = cfg.layernorm_epsilon, cfg.apply_layernorm_1p
        self.ada_modulate_layer = AdaModulate(cond_size, gate_size, dtype)
        self.self_attention = build_module(sub.self_attention, cfg, layer_index, dtype)
        self.self_attn_post_norm = build_module(sub.post_norm, cfg.hidden_size, eps, p1, torch.float32)
        self.mlp = build_module(sub.mlp, cfg, dtype)
        self.mlp_post_norm = build_module(sub.post_norm, cfg.hidden_size, eps, p1, torch.float32)
        self.recompute_full = False  # full recompute: re-run this layer's forward in backward (VideoDiT.set_recompute)

    def forward(self, x, condition, condition_map, sin, cos, placement, y_flat, cross_ranges, kv_hook=None):
        gate_attn, gate_mlp = softcap(self.ada_modulate_layer(condition), 1.0).chunk(2, dim=-1)
        attn = self.self_attention(x, sin, cos, placement, y_flat, cross_ranges, kv_hook)
        x = modulate_add(attn, x, gate_attn, condition_map, self.self_attn_post_norm).to(self.dtype)
        x = modulate_add(self.mlp(x), x, gate_mlp, condition_map, self.mlp_post_norm).to(self.dtype)
        return x
