"""One MAGI-1 transformer layer, written for a single process.

    g          = softcap(Linear(SiLU(c)), 1)           per-chunk gates, (N, dn, 2H)
    h          = LayerNorm_pre(x)                      one plain pre-norm shared by both attentions
    a_self     = SelfAttn(RoPE(LN1p q), RoPE(LN1p k), v)   over AttnRanges (block-causal, KV cache)
    a_cross    = CrossAttn(LN1p qx, LN1p kx, vx)           each chunk to its own caption row
    x          = x + LN1p_post(Linear_proj(interleave(a_self, a_cross)) * g_attn)   gate BEFORE post-norm
    x          = x + LN1p_post(MLP(LayerNorm_pre(x)) * g_mlp)

Tensor parallelism enters only through the linears the `LinearFactory` builds (heads are split across the
TP group; with sequence parallel the residual stream is split by token and the linears gather/scatter it).
Context parallelism enters only in self-attention (Ulysses, see parallel/sequence.py): the residual stream
holds this rank's tokens. The residual stream is (S, N, H), sequence-first.
Rounding points (casts to `dtype`) follow the released model so that its checkpoints reproduce exactly.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from torch import nn
from torch.utils.checkpoint import checkpoint

from magi_train.config.schema import ModelConfig
from magi_train.model.attention import AttnRanges
from magi_train.model.norms import LayerNorm1p, plain_layer_norm
from magi_train.model.rope import apply_rotary
from magi_train.model.spec import LinearFactory
from magi_train.parallel.dispatch import DispatchedTokens
from magi_train.parallel.sequence import heads_to_seq, replicate_kv_heads, seq_to_heads

# The released model multiplies caption tokens by `linear_kv_xattn` as 8 row blocks; the result is the
# same matrix product, but the blocking changes fp32 rounding, and we reproduce it bit for bit.
XATTN_KV_ROW_BLOCKS = 8

# A hook that merges the current keys/values with cached ones: (k, v) -> (k_all, v_all).
KVHook = Callable[[int, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


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


def kv_heads_allocated(cfg: ModelConfig, tp: int) -> int:
    """KV heads summed over the TP ranks: with more ranks than KV heads each rank holds a copy of one."""
    return max(cfg.num_query_groups, tp)


class LayerNormQKV(nn.Module):
    """The shared pre-norm and the four projections (self q/k/v and cross-attention qx)."""

    def __init__(self, cfg: ModelConfig, linears: LinearFactory, dtype: torch.dtype):
        super().__init__()
        q_size = cfg.num_attention_heads * cfg.kv_channels
        kv_size = kv_heads_allocated(cfg, linears.tp_size) * cfg.kv_channels
        self.layer_norm = plain_layer_norm(cfg.hidden_size, cfg.layernorm_epsilon, dtype)
        self.q = linears.column(cfg.hidden_size, q_size)
        self.qx = linears.column(cfg.hidden_size, q_size)
        self.k = linears.column(cfg.hidden_size, kv_size)
        self.v = linears.column(cfg.hidden_size, kv_size)


class ParallelAttention(nn.Module):
    """Self-attention and caption cross-attention from one pre-norm, projected by one linear_proj."""

    def __init__(self, cfg: ModelConfig, linears: LinearFactory, core_attention, layer_index: int, dtype: torch.dtype,
                 cp_group: Optional[torch.distributed.ProcessGroup] = None):
        super().__init__()
        tp = linears.tp_size
        self.layer_index = layer_index
        self.head_dim = cfg.kv_channels
        self.heads = cfg.num_attention_heads // tp
        self.kv_heads = kv_heads_allocated(cfg, tp) // tp
        self.proj_groups = cfg.proj_interleave_groups // tp
        self.kv_row_blocks = max(1, XATTN_KV_ROW_BLOCKS // tp)
        self.core_attention = core_attention
        self.tp_group = linears.tp_group
        # Under sequence parallel the caption gradient is left partial per tp rank like every other
        # replicated input (summed by the trainer); otherwise it is summed here (megatron's convention).
        self.reduce_caption_grad = self.tp_group is not None and not linears.sequence_parallel
        self.cp_group = cp_group if cp_group is not None and cp_group.size() > 1 else None
        self.recompute_attention = False  # selective recompute: re-run the attention kernels in backward
        q_size = cfg.num_attention_heads * cfg.kv_channels

        self.linear_qkv = LayerNormQKV(cfg, linears, dtype)
        xattn_in = int(cfg.hidden_size * cfg.xattn_cond_hidden_ratio)
        # Captions are not split by token: no sequence parallel for this one.
        self.linear_kv_xattn = linears.column(xattn_in, 2 * kv_heads_allocated(cfg, tp) * cfg.kv_channels,
                                              sequence_parallel=False)
        # Computed in fp32 from bf16 weights, as the released model does.
        self.linear_proj = linears.row(2 * q_size, cfg.hidden_size, compute_dtype=torch.float32)
        eps, p1 = cfg.layernorm_epsilon, cfg.apply_layernorm_1p
        # Self-attention QK-norms run in fp32; the cross-attention ones in the model dtype (released layout).
        self.q_layernorm = LayerNorm1p(cfg.kv_channels, eps, p1, torch.float32)
        self.k_layernorm = LayerNorm1p(cfg.kv_channels, eps, p1, torch.float32)
        self.q_layernorm_xattn = LayerNorm1p(cfg.kv_channels, eps, p1, dtype)
        self.k_layernorm_xattn = LayerNorm1p(cfg.kv_channels, eps, p1, dtype)

    def _rope_heads(self, x: torch.Tensor, norm: nn.Module, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        # (S, N, h*d) -> QK-norm and RoPE in fp32 -> (N, S, h, d) batch-major
        S, N, _ = x.shape
        dtype = x.dtype
        x = norm(x.reshape(S, N, -1, self.head_dim).float()).transpose(0, 1)
        return apply_rotary(x, sin, cos).to(dtype)

    def _attend(self, q, k, v, ranges):
        if isinstance(ranges, DispatchedTokens):
            # MagiAttention's distributed attention over the cp group (its kernels, not core_attention).
            if self.recompute_attention and torch.is_grad_enabled():
                return checkpoint(ranges.attend, q, k, v, use_reentrant=False)
            return ranges.attend(q, k, v)
        if self.recompute_attention and torch.is_grad_enabled():
            return checkpoint(self.core_attention, q, k, v, ranges, use_reentrant=False)
        return self.core_attention(q, k, v, ranges)

    def self_attention(self, h, sin, cos, ranges, kv_hook: Optional[KVHook]) -> torch.Tensor:
        """`ranges`: AttnRanges over this forward's tokens, or the `DispatchedTokens` of MagiAttention's cp."""
        S, N, _ = h.shape
        q = self._rope_heads(self.linear_qkv.q(h), self.q_layernorm, sin, cos)
        k = self._rope_heads(self.linear_qkv.k(h), self.k_layernorm, sin, cos)
        v = self.linear_qkv.v(h)
        S = v.shape[0]  # the context-parallel slice (sequence parallel gathered it inside the linears)
        v = v.transpose(0, 1).reshape(N, S, -1, self.head_dim)
        if self.cp_group is not None:
            cp = self.cp_group.size()
            k, v = replicate_kv_heads(k, cp), replicate_kv_heads(v, cp)
            q, k, v = (seq_to_heads(t, self.cp_group) for t in (q, k, v))
        total = q.shape[1]  # every token of the chunks in this forward
        q, k, v = (t.reshape(N * total, -1, self.head_dim) for t in (q, k, v))
        if kv_hook is not None:
            k, v = kv_hook(self.layer_index, k, v)
        out = self._attend(q, k, v, ranges)  # (N*total, h, d)
        out = out.reshape(N, total, -1, self.head_dim)
        if self.cp_group is not None:
            out = heads_to_seq(out, self.cp_group)
        return out.reshape(N, S, -1).transpose(0, 1)

    def cross_attention(self, h, y_flat, ranges: AttnRanges) -> torch.Tensor:
        qx = self.linear_qkv.qx(h)
        S, N, _ = qx.shape
        qx = qx.transpose(0, 1).reshape(N * S, -1, self.head_dim)
        qx = self.q_layernorm_xattn(qx)
        if self.reduce_caption_grad:
            # Captions are replicated over the TP group; their gradient must be summed over it.
            y_flat = copy_to_tensor_model_parallel_region(y_flat, group=self.tp_group)
        weight = self.linear_kv_xattn.weight
        kv = torch.cat([torch.matmul(y_flat, w.t()) for w in torch.chunk(weight, self.kv_row_blocks, dim=0)], dim=1)
        # Rows are interleaved per KV head: [K_0 | V_0 | K_1 | V_1 | ...], 128 each.
        kx, vx = kv.view(y_flat.shape[0], self.kv_heads, 2 * self.head_dim).chunk(2, dim=-1)
        kx = self.k_layernorm_xattn(kx)
        out = self._attend(qx, kx, vx.contiguous(), ranges)
        return out.reshape(N, S, -1).transpose(0, 1)

    def forward(self, x, sin, cos, self_ranges, y_flat, cross_ranges, kv_hook=None) -> torch.Tensor:
        h = self.linear_qkv.layer_norm(x)
        a_self = self.self_attention(h, sin, cos, self_ranges, kv_hook)
        a_cross = self.cross_attention(h, y_flat, cross_ranges)
        # [self heads | cross heads] -> per group of heads [self_g | cross_g] (released TP8 layout).
        mixed = torch.cat([a_self, a_cross], dim=2)
        mixed = rearrange(mixed, "s n (two g d) -> s n (g two d)", two=2, g=self.proj_groups)
        return self.linear_proj(mixed)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, linears: LinearFactory, dtype: torch.dtype):
        super().__init__()
        self.gated = cfg.gated_linear_unit
        self.layer_norm = plain_layer_norm(cfg.hidden_size, cfg.layernorm_epsilon, dtype)
        fc1_out = (2 if self.gated else 1) * cfg.ffn_hidden_size
        self.linear_fc1 = linears.column(cfg.hidden_size, fc1_out)
        self.linear_fc2 = linears.row(cfg.ffn_hidden_size, cfg.hidden_size)

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
    def __init__(self, cfg: ModelConfig, linears: LinearFactory, core_attention, layer_index: int, dtype: torch.dtype,
                 cp_group: Optional[torch.distributed.ProcessGroup] = None):
        super().__init__()
        self.dtype = dtype
        cond_size = int(cfg.hidden_size * cfg.cond_hidden_ratio)
        gate_size = int(cfg.hidden_size * cfg.cond_gating_ratio)
        eps, p1 = cfg.layernorm_epsilon, cfg.apply_layernorm_1p
        self.ada_modulate_layer = AdaModulate(cond_size, gate_size, dtype)
        self.self_attention = ParallelAttention(cfg, linears, core_attention, layer_index, dtype, cp_group)
        self.self_attn_post_norm = LayerNorm1p(cfg.hidden_size, eps, p1, torch.float32)
        self.mlp = MLP(cfg, linears, dtype)
        self.mlp_post_norm = LayerNorm1p(cfg.hidden_size, eps, p1, torch.float32)
        self.recompute_full = False  # full recompute: re-run this layer's forward in backward (VideoDiT.set_recompute)

    def forward(self, x, condition, condition_map, sin, cos, self_ranges, y_flat, cross_ranges, kv_hook=None):
        gate_attn, gate_mlp = softcap(self.ada_modulate_layer(condition), 1.0).chunk(2, dim=-1)
        attn = self.self_attention(x, sin, cos, self_ranges, y_flat, cross_ranges, kv_hook)
        x = modulate_add(attn, x, gate_attn, condition_map, self.self_attn_post_norm).to(self.dtype)
        x = modulate_add(self.mlp(x), x, gate_mlp, condition_map, self.mlp_post_norm).to(self.dtype)
        return x
