"""The MAGI-1 video DiT, faithful to the released model (state-dict keys, shapes and numerics).

Inputs of one forward:
    x        (N, C, T, H, W)  latents of `dn` consecutive chunks per sample (T = dn * chunk frames)
    t        (N, dn)          flow-matching time of each chunk, 0 = noise, 1 = clean
    caption  (N*dn, L, Cc)    one caption row per chunk (T5 features), with
    caption_mask (N*dn, L)    its valid tokens
    self_ranges               AttnRanges over the flat, batch-major token index (see attention.py)
    adaln_uncond (N,) or (N, dn)  adaLN "caption dropped" flag per sample or per chunk (row -1 of the
                              null caption, else row -2)
Output: the velocity (N, C, T, H, W) in fp32, already divided by `x_rescale_factor`.

The model is written for one process and knows no process group. `parallelize_dit`
(magi_train/parallel/parallelize.py) makes a parallel model of it: tensor-parallel linears in the spec's
slots, a token layout (layout.py) for context / sequence parallel, and a pipeline stage's share of the
layers (the others removed; parameter names stay the whole model's).

One layer (the residual stream is (S, N, H), sequence-first; rounding points follow the released model):

    g        = softcap(Linear(SiLU(c)), 1)                 per-chunk gates, (N, dn, 2H)
    h        = LayerNorm_pre(x)                            one plain pre-norm shared by both attentions
    a_self   = SelfAttn(RoPE(LN1p q), RoPE(LN1p k), v)     over the placement's ranges (block-causal, KV cache)
    a_cross  = CrossAttn(LN1p qx, LN1p kx, vx)             each chunk to its own caption row
    x        = x + LN1p_post(Linear_proj(interleave(a_self, a_cross)) * g_attn)   gate BEFORE post-norm
    x        = x + LN1p_post(MLP(LayerNorm_pre(x)) * g_mlp)

The slots (linears, norms, core attention) are filled from a layer spec (spec.py); the conventions are those
of magi_train/model/README.md §1.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from magi_train.config.schema import ModelConfig
from magi_train.model.attention import AttnRanges, caption_ranges, row_block_causal_ranges
from magi_train.model.embedders import CaptionEmbedder, FinalLinear, TimestepEmbedder
from magi_train.model.layout import LocalLayout, LocalPlacement, TokenLayout
from magi_train.model.norms import LayerNorm1p
from magi_train.model.rope import LearnableRope3D, apply_rotary, split_table
from magi_train.model.spec import (AttentionSubmodules, LayerImpl, LayerSubmodules, LinearConfig, MLPSubmodules,
                                   ModuleSpec, build_module, get_layer_spec, scaled_init_std)
from magi_train.model.storage import allocate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Modules kept in fp32 whatever the model dtype (the released `_high_precision_promoter` list).
FP32_MODULES = ("x_embedder", "t_embedder", "y_embedder", "final_linear", "rope", "q_layernorm", "k_layernorm",
                "self_attn_post_norm", "mlp_post_norm", "final_layernorm")

# A hook that merges the current keys/values with cached ones: (layer, k, v) -> (k_all, v_all).
KVHook = Callable[[int, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


# ---------------------------------------------------------------------------- one transformer layer
def transformer_layer_spec(impl: LayerImpl) -> ModuleSpec:
    """The slot tree of one layer, filled from `impl` (see spec.py)."""
    attention = ModuleSpec(SelfCrossAttention, submodules=AttentionSubmodules(
        impl.pre_norm, impl.column_linear, impl.caption_linear, impl.row_linear, impl.norm,
        impl.core_attention, impl.core_attention))
    mlp = ModuleSpec(MLP, submodules=MLPSubmodules(impl.pre_norm, impl.column_linear, impl.row_linear))
    return ModuleSpec(TransformerLayer, submodules=LayerSubmodules(attention, mlp, impl.norm))


def _skip_init(_: torch.Tensor) -> None:
    """megatron's init hook; unused: VideoDiT.init_weights draws full-size weights itself."""


def build_linear(spec, in_features: int, out_features: int, dtype: torch.dtype,
                 compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A single-process linear slot (global sizes, no process group)."""
    return build_module(spec, in_features, out_features, config=LinearConfig(dtype), init_method=_skip_init,
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


# ---------------------------------------------------------------------------- the model
@dataclass
class Stream:
    """What flows between pipeline stages: the residual stream and the conditioning every layer reads."""

    h: torch.Tensor  # (S_local, N, H) this rank's tokens (the placement's split)
    condition: torch.Tensor  # (N, dn, Dc) timestep + adaLN caption token per chunk
    y_xattn: torch.Tensor  # (N*dn, L, Hx) projected caption rows (padded)
    caption_mask: torch.Tensor  # (N*dn, L) valid caption tokens
    sin: torch.Tensor  # (S_q, R/2) RoPE of the tokens this rank's attention queries cover
    cos: torch.Tensor
    # (N, S) caption/condition row of every token (all tokens, -1 = padding) for packed sequences; None for
    # dense batches, where token s of sample b is in row b * dn + s // tokens_per_chunk.
    rows: Optional[torch.Tensor] = None


def dense_rows(N: int, dn: int, tokens_per_chunk: int, device=None) -> torch.Tensor:
    """(N, S) row of each token of a dense batch: b * dn + s // tokens_per_chunk."""
    return torch.arange(N * dn, device=device).repeat_interleave(tokens_per_chunk).reshape(N, -1)


class LayerDict(nn.ModuleDict):
    """Layers keyed by their global index ("0", "1", ...); indexed and iterated like a ModuleList."""

    def __getitem__(self, key):
        return super().__getitem__(str(key))

    def __iter__(self):
        return iter(self._modules.values())


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_spec: ModuleSpec, dtype: torch.dtype):
        super().__init__()
        # Keyed by the layer index, so a pipeline stage that keeps some of them keeps the full model's names.
        self.layers = LayerDict({str(i): build_module(layer_spec, cfg, i, dtype) for i in range(cfg.num_layers)})
        self.final_layernorm = LayerNorm1p(cfg.hidden_size, cfg.layernorm_epsilon, cfg.apply_layernorm_1p, torch.float32)


class VideoDiT(nn.Module):
    """The DiT. `forward` runs the whole model; a pipeline stage runs `embed` (if it has the embedders),
    `run_layers` and `head` (if it has the output layer), each given the same `place(...)` of the micro-batch.

    `token_layout` (default: every token here) is the seam for context / sequence parallelism; `parallelize_dit`
    replaces it, swaps the linears for tensor-parallel ones and drops what another pipeline stage holds."""

    def __init__(self, cfg: ModelConfig, layer_spec: ModuleSpec, init_weights: bool = True, init_seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.dtype = DTYPES[cfg.params_dtype]
        H = cfg.hidden_size
        cond_size = int(H * cfg.cond_hidden_ratio)
        patch = (cfg.t_patch_size, cfg.patch_size, cfg.patch_size)
        self.token_layout: TokenLayout = LocalLayout()

        self.x_embedder = nn.Conv3d(cfg.in_channels, H, kernel_size=patch, stride=patch, bias=False)
        self.t_embedder = TimestepEmbedder(cond_size, 256, cfg.timestep_rescale_factor, feature_dtype=self.dtype)
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, int(H * cfg.xattn_cond_hidden_ratio), cond_size, cfg.caption_max_length)
        self.rope = LearnableRope3D(H // cfg.num_attention_heads, cfg.rope_temperature, cfg.rope_reference_tokens)
        self.videodit_blocks = TransformerBlock(cfg, layer_spec, self.dtype)
        self.final_linear = FinalLinear(H, cfg.t_patch_size * cfg.patch_size**2 * cfg.out_channels)
        if init_weights:
            self.init_weights(init_seed)

    # A pipeline stage that does not hold the embedders / the output layer has them removed.
    @property
    def pre_process(self) -> bool:
        return "x_embedder" in self._modules

    @property
    def post_process(self) -> bool:
        return "final_linear" in self._modules

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_defaults(self) -> None:
        """Norms and RoPE bands at their constructor values (`init_weights` draws everything else)."""
        for module in self.modules():
            if isinstance(module, (LayerNorm1p, nn.LayerNorm, LearnableRope3D)):
                module.reset_parameters()

    @torch.no_grad()
    def init_weights(self, seed: int, full_shapes: Optional[Dict[str, Tuple[int, ...]]] = None,
                     shard: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None) -> None:
        """Every parameter is drawn at its full (TP=1) size, `full_shapes[name]` (default: its own shape), from a
        generator seeded by (seed, its name), then cut to this rank's part by `shard(name, full)` (default: all
        of it): any TP/PP layout starts from exactly the same model."""
        cfg = self.cfg
        self.reset_defaults()
        row_std = scaled_init_std(cfg.init_std, cfg.num_layers)
        for name, p in self.named_parameters():
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
            shape = tuple(p.shape) if full_shapes is None else full_shapes[name]
            full = None
            if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
                # Residual-branch outputs: depth-scaled (GPT-2 / megatron output_init_method).
                full = torch.empty(shape).normal_(0.0, row_std, generator=gen)
            elif name == "final_linear.linear.weight":
                full = torch.zeros(shape)  # the untrained model predicts zero velocity (standard DiT)
            elif name == "x_embedder.weight":
                fan_in, fan_out = shape[1] * shape[2] * shape[3] * shape[4], shape[0]
                bound = (6.0 / (fan_in + fan_out)) ** 0.5  # xavier-uniform of the flattened kernel
                full = torch.empty(shape).uniform_(-bound, bound, generator=gen)
            elif name.endswith("null_caption_embedding") or (p.ndim == 2 and "norm" not in name):
                full = torch.empty(shape).normal_(0.0, cfg.init_std, generator=gen)
            elif name.endswith(".bias") and "norm" not in name:
                full = torch.zeros(shape)
            if full is not None:
                p.copy_((full if shard is None else shard(name, full)).to(p.dtype))

    # ------------------------------------------------------------------ token placement
    def place(self, self_ranges: Optional[AttnRanges], N: int, tokens_per_sample: int):
        """The token placement of one forward (layout.py): what `embed`, `run_layers` and `head` take. Under
        MagiAttention's dispatch, building it is a collective over the cp group."""
        return self.token_layout.place(self_ranges, N, tokens_per_sample)

    def stream_shapes(self, placement, N: int, tokens_per_sample: int) -> Tuple[Tuple[int, int], int]:
        """((rows, batch) of this rank's residual stream, rows of its RoPE tables) for one micro-batch."""
        if placement is None:
            placement = self.place(None, N, tokens_per_sample)
        return placement.stream_shape()

    def _placement_of(self, h: torch.Tensor, placement):
        if placement is not None:
            return placement
        if isinstance(self.token_layout, LocalLayout):
            return LocalPlacement(None, h.shape[1], h.shape[0])
        raise ValueError("a parallel token layout needs the micro-batch's VideoDiT.place(...) (the token split "
                         "follows it)")

    # ------------------------------------------------------------------ forward
    def embed(self, x, t, caption, caption_mask, adaln_uncond=None, slice_point: int = 0,
              distill_dt: Optional[float] = None, placement=None) -> Tuple[Stream, Tuple[int, int, int]]:
        cfg = self.cfg
        N, dn = t.shape
        if caption.shape[0] != N * dn or caption_mask.shape[:2] != caption.shape[:2]:
            raise ValueError(f"caption {tuple(caption.shape)} / caption_mask {tuple(caption_mask.shape)} must have N*dn = {N * dn} rows")
        x = x * cfg.x_rescale_factor
        if cfg.half_channel_vae:
            if x.shape[1] * 2 != cfg.in_channels:
                raise ValueError(f"half_channel_vae expects {cfg.in_channels // 2} latent channels, got {x.shape[1]}")
            x = torch.cat([x, x], dim=1)
        x = self.x_embedder(x.float())  # (N, H, T', H', W')
        _, _, T, Hp, Wp = x.shape
        if T % dn:
            raise ValueError(f"{T} latent frames do not split into {dn} chunks")
        sin, cos = split_table(self.rope.table(T, Hp, Wp, frame_offset=(T // dn) * slice_point))

        if adaln_uncond is None:
            adaln_uncond = torch.zeros(N, dtype=torch.bool, device=x.device)
        if adaln_uncond.shape not in ((N,), (N, dn)):
            raise ValueError(f"adaln_uncond has shape {tuple(adaln_uncond.shape)}; expected ({N},) or ({N}, {dn})")
        condition, y_xattn = self._condition(t, caption, adaln_uncond, distill_dt)  # (N, dn, Dc)

        h = rearrange(x.to(self.dtype), "n c t h w -> (t h w) n c")
        placement = self.place(None, N, h.shape[0]) if placement is None else placement
        # This rank's tokens and RoPE rows (a split's backward pads with zeros: gradients stay partial).
        stream = Stream(placement.split(h), condition.to(self.dtype), y_xattn.to(self.dtype), caption_mask,
                        placement.rope(sin), placement.rope(cos))
        return stream, (T, Hp, Wp)

    def embed_packed(self, patches, t, caption, caption_mask, adaln_uncond, coords, token_map,
                     distill_dt: Optional[float] = None, placement=None) -> Stream:
        """Packed sequences: samples of any size and length side by side in one token sequence.

        patches (N, S, C*pt*p*p) noisy latent patches in (t h w) order per sample, channel-major inside a
        patch (`patchify`), zeros for padding; t (N, R) time of each caption row (a sample's chunk);
        caption (N*R, L, Cc) with caption_mask; adaln_uncond (N, R) bool; coords (N, S, 3) RoPE coordinates
        (`rope_coords` per sample); token_map (N, S, 2) [global row b*R + r, sample id] per token, -1 for
        padding. N must be 1 (one packed sequence per micro-batch: every sequence has its own RoPE rows).
        """
        cfg = self.cfg
        N, S, _ = patches.shape
        R = t.shape[1]
        if N != 1:
            raise ValueError(f"packed sequences run one per micro-batch (data.micro_batch_size=1), got {N}")
        if caption.shape[0] != N * R or token_map.shape != (N, S, 2) or coords.shape != (N, S, 3):
            raise ValueError(f"packed inputs disagree: patches {tuple(patches.shape)}, t {tuple(t.shape)}, caption "
                             f"{tuple(caption.shape)}, coords {tuple(coords.shape)}, token_map {tuple(token_map.shape)}")
        x = patches.float() * cfg.x_rescale_factor
        if cfg.half_channel_vae:
            x = x.reshape(N, S, cfg.in_channels // 2, -1)
            x = torch.cat([x, x], dim=2).reshape(N, S, -1)
        weight = self.x_embedder.weight  # (H, C, pt, p, p): the Conv3d applied to each patch is this linear map
        h = F.linear(x, weight.reshape(weight.shape[0], -1).float())
        sin, cos = split_table(self.rope.table_at(coords[0].float()))
        condition, y_xattn = self._condition(t, caption, adaln_uncond, distill_dt)
        placement = self.place(None, N, S) if placement is None else placement
        rows = token_map[..., 0].round().long()
        return Stream(placement.split(h.to(self.dtype).transpose(0, 1)), condition.to(self.dtype),
                      y_xattn.to(self.dtype), caption_mask, placement.rope(sin), placement.rope(cos), rows)

    def _condition(self, t, caption, adaln_uncond, distill_dt):
        """(N, R, Dc) timestep + adaLN caption token per row, and the projected caption rows."""
        cfg = self.cfg
        N, R = t.shape
        t_flat = t.flatten().float()
        t_emb = self.t_embedder(t_flat)
        if cfg.distill:
            if distill_dt is None:
                raise ValueError("a distilled model (model.distill=true) needs distill_dt (the step-size embedding input)")
            if isinstance(distill_dt, torch.Tensor) and distill_dt.numel() > 1:  # one per sample (N,)
                dt = distill_dt.float().reshape(N, 1).expand(N, R).flatten()
            else:
                dt = torch.full_like(t_flat, float(distill_dt))
            t_emb = t_emb + self.t_embedder(dt)
        y_xattn, y_adaln = self.y_embedder(caption.float(), adaln_uncond)
        return t_emb.reshape(N, R, -1) + y_adaln, y_xattn

    def set_recompute(self, mode: str, layers: int = 0) -> None:
        """Activation recompute: "full" re-runs whole layers in backward, "selective" only their attention
        kernels, "none" neither; for the first `layers` layers held here (0 = all)."""
        for position, layer in enumerate(self.videodit_blocks.layers):
            chosen = layers == 0 or position < layers
            layer.recompute_full = mode == "full" and chosen
            layer.self_attention.recompute_attention = mode == "selective" and chosen

    @staticmethod
    def _layer(layer, *args):
        if layer.recompute_full and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def run_layers(self, s: Stream, placement, kv_hook: Optional[KVHook] = None) -> Stream:
        """`placement`: the micro-batch's `place(...)` (plain AttnRanges do on one process)."""
        N, dn = s.condition.shape[:2]
        if isinstance(placement, AttnRanges):
            if not isinstance(self.token_layout, LocalLayout):
                raise ValueError("a parallel token layout needs the micro-batch's VideoDiT.place(...), not AttnRanges")
            placement = LocalPlacement(placement, N, s.h.shape[0])
        if kv_hook is not None and not placement.supports_kv_cache:
            raise ValueError("a KV cache runs with Ulysses context parallel (parallel.cp_impl=ulysses), not with "
                             "MagiAttention's dispatch")
        mask = s.caption_mask.bool()
        y_flat = s.y_xattn[mask]  # valid caption tokens of every (sample, chunk) row, row-major
        lengths = mask.sum(-1).tolist()
        total = placement.tokens
        rows = s.rows if s.rows is not None else dense_rows(N, dn, total // dn, s.h.device)
        # Each token takes its chunk row's condition (padding any row: its outputs are never used).
        condition_map = placement.stream_rows(rows).clamp(min=0)
        # Attention's queries, numbered batch-major like its coordinates.
        cross_ranges = caption_ranges(placement.query_rows(rows), lengths)
        h = s.h
        for layer in self.videodit_blocks.layers:
            h = self._layer(layer, h, s.condition, condition_map, s.sin, s.cos, placement, y_flat, cross_ranges, kv_hook)
        return Stream(h, s.condition, s.y_xattn, s.caption_mask, s.sin, s.cos, s.rows)

    def head_tokens(self, h: torch.Tensor, placement=None) -> torch.Tensor:
        """Velocity per token of a packed sequence: (N, C_out*pt*p*p, S) (channels first, like the dense
        head's output), in `patchify`'s channel-major patch order, divided by `x_rescale_factor`."""
        cfg = self.cfg
        out = self._final_tokens(h, placement)  # (S, N, (pt ph pw c))
        S, N, _ = out.shape
        out = out.reshape(S, N, -1, cfg.out_channels).transpose(2, 3)  # channel-major within the patch
        if cfg.half_channel_vae:
            out = out[:, :, : cfg.out_channels // 2]
        return out.reshape(S, N, -1).permute(1, 2, 0) / cfg.x_rescale_factor

    def _final_tokens(self, h: torch.Tensor, placement) -> torch.Tensor:
        placement = self._placement_of(h, placement)
        h = self.videodit_blocks.final_layernorm(h.float())
        # All tokens on every rank; the backward keeps each rank's own part.
        return placement.gather(self.final_linear(h))

    def head(self, h: torch.Tensor, grid: Tuple[int, int, int], placement=None) -> torch.Tensor:
        cfg = self.cfg
        T, Hp, Wp = grid
        out = self._final_tokens(h, placement)
        out = rearrange(out, "(t h w) n (pt ph pw c) -> n c (t pt) (h ph) (w pw)", t=T, h=Hp, w=Wp,
                        pt=cfg.t_patch_size, ph=cfg.patch_size, pw=cfg.patch_size)
        if cfg.half_channel_vae:
            out = out[:, : cfg.out_channels // 2]
        return out / cfg.x_rescale_factor

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        caption: torch.Tensor,
        caption_mask: torch.Tensor,
        self_ranges: AttnRanges,
        adaln_uncond: Optional[torch.Tensor] = None,
        slice_point: int = 0,
        distill_dt: Optional[float] = None,
        kv_hook: Optional[KVHook] = None,
    ) -> torch.Tensor:
        if not (self.pre_process and self.post_process):
            raise RuntimeError("forward() runs the whole model; a pipeline stage runs embed / run_layers / head")
        p, pt = self.cfg.patch_size, self.cfg.t_patch_size
        tokens = (x.shape[2] // pt) * (x.shape[3] // p) * (x.shape[4] // p)
        placement = self.place(self_ranges, x.shape[0], tokens)
        stream, grid = self.embed(x, t, caption, caption_mask, adaln_uncond, slice_point, distill_dt, placement)
        stream = self.run_layers(stream, placement, kv_hook)
        return self.head(stream.h, grid, placement)

    def forward_packed(self, patches, t, caption, caption_mask, adaln_uncond, coords, token_map,
                       distill_dt: Optional[float] = None) -> torch.Tensor:
        """The whole model on one packed sequence (see `embed_packed` for the inputs; captions already
        dropped where they should be): (1, C_out*pt*p*p, S) velocity per token, block-causal inside each sample."""
        if not (self.pre_process and self.post_process):
            raise RuntimeError("forward_packed() runs the whole model; a pipeline stage runs embed_packed / run_layers / head_tokens")
        placement = self.place(row_block_causal_ranges(token_map), 1, patches.shape[1])
        stream = self.embed_packed(patches, t, caption, caption_mask, adaln_uncond, coords, token_map,
                                   distill_dt=distill_dt, placement=placement)
        return self.head_tokens(self.run_layers(stream, placement).h, placement)

    # ------------------------------------------------------------------ helpers
    def drop_captions(self, caption, caption_mask, dropped_rows):
        return self.y_embedder.drop(caption, caption_mask, dropped_rows, self.cfg.null_caption_length)


def build_dit(cfg: ModelConfig, tp_group=None, init_weights: bool = True, device: Optional[torch.device] = None,
              init_seed: int = 0) -> VideoDiT:
    """The single-process DiT with the configured layer spec: built on the meta device, materialised on
    `device` (default CPU) and initialised from `init_seed` (`init_weights=False`: to be loaded). `device="meta"`
    builds shapes only. A parallel model comes from `magi_train.parallel.parallelize.parallelize_dit`.

    `tp_group` is accepted for callers of the single-process model that hold a one-rank group."""
    if tp_group is not None and tp_group.size() != 1:
        raise ValueError(f"build_dit builds the single-process model; for a tensor-parallel group of {tp_group.size()} "
                         f"ranks use magi_train.parallel.parallelize (parallelize_dit)")
    model = meta_dit(cfg)
    if device is not None and torch.device(device).type == "meta":
        return model
    allocate(model, device or "cpu")  # to_empty without torch.fx's import of sympy (storage.py)
    if init_weights:
        model.init_weights(init_seed)
    else:
        model.reset_defaults()
    return model


def meta_dit(cfg: ModelConfig) -> VideoDiT:
    """The whole model's shapes on the meta device (the first step of every build)."""
    spec = transformer_layer_spec(get_layer_spec(cfg.layer_spec, cfg.attention_backend))
    with torch.device("meta"):
        return VideoDiT(cfg, spec, init_weights=False)


def full_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of the whole, unsharded model's state dict: the released MAGI-1 layout of `cfg`."""
    return {k: tuple(v.shape) for k, v in build_dit(cfg, device="meta").state_dict().items()}


def module_dtype_plan(model: VideoDiT) -> dict:
    """Expected run-time dtype of every parameter: fp32 for the promotion list, model dtype otherwise."""
    plan = {}
    for name, p in model.named_parameters():
        promoted = any(part in FP32_MODULES for part in name.split("."))
        plan[name] = torch.float32 if promoted else model.dtype
    return plan
