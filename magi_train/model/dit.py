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

The model is written for one process; TP/CP/PP come from the layer spec and the parallel package.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from magi_train.config.schema import ModelConfig
from magi_train.model.attention import AttnRanges, caption_ranges, row_block_causal_ranges
from magi_train.model.embedders import CaptionEmbedder, FinalLinear, TimestepEmbedder
from magi_train.model.layers import KVHook, TransformerLayer, kv_heads_allocated
from magi_train.model.magi_attention import MagiContextParallel
from magi_train.model.norms import LayerNorm1p
from magi_train.model.rope import LearnableRope3D, split_table
from magi_train.model.spec import DiTLayerSpec, LinearFactory, get_layer_spec, megatron_config, scaled_init_std
from magi_train.parallel.dispatch import DispatchedTokens
from magi_train.parallel.groups import default_tp_group
from magi_train.parallel.sequence import TokenWindow, gather_tokens
from magi_train.parallel.sharding import local_from_full, tp_shard_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Modules kept in fp32 whatever the model dtype (the released `_high_precision_promoter` list).
FP32_MODULES = ("x_embedder", "t_embedder", "y_embedder", "final_linear", "rope", "q_layernorm", "k_layernorm",
                "self_attn_post_norm", "mlp_post_norm", "final_layernorm")

# Parameters whose gradient is partial on each tensor-parallel rank even without sequence parallel: they
# act on every head, and each rank holds only its heads.
_HEAD_SHARED = ("q_layernorm", "k_layernorm", "q_layernorm_xattn", "k_layernorm_xattn", "rope")


@dataclass
class Stream:
    """What flows between pipeline stages: the residual stream and the conditioning every layer reads."""

    h: torch.Tensor  # (S_local, N, H) this rank's tokens; (L, 1, H) under MagiAttention's dispatch
    condition: torch.Tensor  # (N, dn, Dc) timestep + adaLN caption token per chunk
    y_xattn: torch.Tensor  # (N*dn, L, Hx) projected caption rows (padded)
    caption_mask: torch.Tensor  # (N*dn, L) valid caption tokens
    sin: torch.Tensor  # (S_cp, R/2) RoPE of the context-parallel rank's tokens
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


def _skip_init(_: torch.Tensor) -> None:
    """megatron's init hook; unused because VideoDiT._init_weights draws full-size weights itself."""


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, linears: LinearFactory, core_attention, dtype: torch.dtype,
                 layer_ids: Sequence[int], final_norm: bool, cp_group=None):
        super().__init__()
        # Keyed by the global layer index, so a pipeline stage's parameter names equal the full model's.
        self.layers = LayerDict(
            {str(i): TransformerLayer(cfg, linears, core_attention, i, dtype, cp_group) for i in layer_ids})
        if final_norm:
            self.final_layernorm = LayerNorm1p(cfg.hidden_size, cfg.layernorm_epsilon, cfg.apply_layernorm_1p, torch.float32)


class VideoDiT(nn.Module):
    """The DiT, or one pipeline stage of it (`layer_ids`, `pre_process`, `post_process`).

    Parallel groups are injected: `tp_group` (heads), `cp_group` (tokens) and `sequence_parallel`.
    `cp_impl` picks how cp splits the tokens: "ulysses" (contiguous windows, all-to-all in attention) or
    "magi" (MagiAttention's balanced dispatch, parallel/dispatch.py; training only, no KV cache).
    `forward` runs the whole model; a pipeline runs `embed` on the first stage, `run_layers` on every
    stage and `head` on the last, each given the same `place(...)` of the micro-batch."""

    def __init__(self, cfg: ModelConfig, spec: DiTLayerSpec, tp_group: Optional[torch.distributed.ProcessGroup] = None,
                 init_weights: bool = True, *, cp_group: Optional[torch.distributed.ProcessGroup] = None,
                 sequence_parallel: bool = False, layer_ids: Optional[Sequence[int]] = None,
                 pre_process: bool = True, post_process: bool = True, init_seed: int = 0, cp_impl: str = "ulysses"):
        super().__init__()
        self.cfg = cfg
        self.dtype = DTYPES[cfg.params_dtype]
        H = cfg.hidden_size
        cond_size = int(H * cfg.cond_hidden_ratio)
        self.tp_group = tp_group
        self.tp_size = 1 if tp_group is None else tp_group.size()
        self.cp_group = cp_group if cp_group is not None and cp_group.size() > 1 else None
        if cp_impl not in ("ulysses", "magi"):
            raise ValueError(f"parallel.cp_impl={cp_impl!r} is not one of ulysses, magi")
        self.magi_cp = None
        if cp_impl == "magi" and self.cp_group is not None:
            self.magi_cp = MagiContextParallel(self.cp_group, cfg.num_attention_heads // self.tp_size,
                                               kv_heads_allocated(cfg, self.tp_size) // self.tp_size, cfg.kv_channels)
        ulysses_group = self.cp_group if self.magi_cp is None else None
        self.sequence_parallel = bool(sequence_parallel) and self.tp_size > 1
        self.pre_process, self.post_process = pre_process, post_process
        layer_ids = list(range(cfg.num_layers)) if layer_ids is None else list(layer_ids)
        linears = LinearFactory(spec, megatron_config(self.dtype, self.tp_size, init_weights), _skip_init, _skip_init, tp_group,
                                self.sequence_parallel)
        patch = (cfg.t_patch_size, cfg.patch_size, cfg.patch_size)

        if pre_process:
            self.x_embedder = nn.Conv3d(cfg.in_channels, H, kernel_size=patch, stride=patch, bias=False)
            self.t_embedder = TimestepEmbedder(cond_size, 256, cfg.timestep_rescale_factor, feature_dtype=self.dtype)
            self.y_embedder = CaptionEmbedder(cfg.caption_channels, int(H * cfg.xattn_cond_hidden_ratio), cond_size, cfg.caption_max_length)
            self.rope = LearnableRope3D(H // cfg.num_attention_heads, cfg.rope_temperature, cfg.rope_reference_tokens)
        self.videodit_blocks = TransformerBlock(cfg, linears, spec.core_attention, self.dtype, layer_ids, post_process, ulysses_group)
        if post_process:
            self.final_linear = FinalLinear(H, cfg.t_patch_size * cfg.patch_size**2 * cfg.out_channels)
        if init_weights:
            self._init_weights(init_seed)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        """Every parameter is drawn at full (TP=1) size from a generator seeded by (seed, its name), then
        sliced for this rank: any TP/PP layout starts from exactly the same model."""
        cfg = self.cfg
        full_shapes = {k: tuple(v.shape) for k, v in build_dit(cfg, device="meta").named_parameters()}
        row_std = scaled_init_std(cfg.init_std, cfg.num_layers)
        for name, p in self.named_parameters():
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
            shape = full_shapes[name]
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
                p.copy_(local_from_full(full, self.shard_spec(name, shape)).to(p.dtype))

    def shard_spec(self, name: str, full_shape):
        rank = 0 if self.tp_group is None else self.tp_group.rank()
        return tp_shard_spec(name, full_shape, self.cfg, rank, self.tp_size)

    def tp_partial_grad(self, name: str) -> bool:
        """Whether this TP-replicated parameter's gradient is a partial sum per TP rank (to be all-reduced)."""
        if self.tp_size == 1 or tp_shard_spec(name, (1, 1), self.cfg, 0, self.tp_size).dim is not None:
            return False
        return self.sequence_parallel or any(part in _HEAD_SHARED for part in name.split("."))

    # ------------------------------------------------------------------ parallel helpers
    def _window(self, total_tokens: int) -> TokenWindow:
        cp = 1 if self.cp_group is None else self.cp_group.size()
        cp_rank = 0 if self.cp_group is None else self.cp_group.rank()
        split = self.tp_size if self.sequence_parallel else 1
        tp_rank = self.tp_group.rank() if split > 1 else 0
        return TokenWindow.of(total_tokens, cp_rank, cp, tp_rank, split)

    def _split_factor(self) -> int:
        return (1 if self.cp_group is None else self.cp_group.size()) * (self.tp_size if self.sequence_parallel else 1)

    def place(self, self_ranges: AttnRanges, N: int, tokens_per_sample: int):
        """What `embed`, `run_layers` and `head` take as the micro-batch's self-attention: the ranges
        themselves, or under MagiAttention's dispatch the `DispatchedTokens` built from them (a collective
        over the cp group)."""
        if self.magi_cp is None:
            return self_ranges
        split = self.tp_size if self.sequence_parallel else 1
        tp_rank = self.tp_group.rank() if split > 1 else 0
        return DispatchedTokens(self.magi_cp, self_ranges, N, tokens_per_sample, tp_rank, split)

    def stream_shapes(self, placement, N: int, tokens_per_sample: int) -> Tuple[Tuple[int, int], int]:
        """((rows, batch) of this rank's residual stream, rows of its RoPE tables) for one micro-batch."""
        if isinstance(placement, DispatchedTokens):
            return (placement.ids.numel(), 1), placement.ids_cp.numel()
        cp = 1 if self.cp_group is None else self.cp_group.size()
        return (tokens_per_sample // self._split_factor(), N), tokens_per_sample // cp

    def _dispatched(self, placement) -> Optional[DispatchedTokens]:
        if isinstance(placement, DispatchedTokens):
            return placement
        if self.magi_cp is not None:
            raise ValueError("parallel.cp_impl=magi: pass the micro-batch's VideoDiT.place(...) as its self-attention "
                             "(the token split follows MagiAttention's dispatch)")
        return None

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
        h, sin, cos = self._local_tokens(h, sin, cos, placement)
        stream = Stream(h, condition.to(self.dtype), y_xattn.to(self.dtype), caption_mask, sin, cos)
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
        h, sin, cos = self._local_tokens(h.to(self.dtype).transpose(0, 1), sin, cos, placement)
        rows = token_map[..., 0].round().long()
        return Stream(h, condition.to(self.dtype), y_xattn.to(self.dtype), caption_mask, sin, cos, rows)

    def _local_tokens(self, h, sin, cos, placement):
        """This rank's part of the (S, N, H) tokens and the RoPE rows of its context-parallel tokens.
        `narrow`'s backward pads with zeros (gradients stay partial, see sequence.py)."""
        dispatched = self._dispatched(placement)
        if dispatched is not None:
            return dispatched.split(h), dispatched.rope(sin), dispatched.rope(cos)
        window = self._window(h.shape[0])
        return (h.narrow(0, window.start, window.length).contiguous(),
                sin.narrow(0, window.cp_start, window.cp_length), cos.narrow(0, window.cp_start, window.cp_length))

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
        kernels, "none" neither; for the first `layers` layers of this stage (0 = all)."""
        for position, layer in enumerate(self.videodit_blocks.layers):
            chosen = layers == 0 or position < layers
            layer.recompute_full = mode == "full" and chosen
            layer.self_attention.recompute_attention = mode == "selective" and chosen

    @staticmethod
    def _layer(layer, *args):
        if layer.recompute_full and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def run_layers(self, s: Stream, self_ranges, kv_hook: Optional[KVHook] = None) -> Stream:
        """`self_ranges`: the micro-batch's `place(...)` (plain AttnRanges unless MagiAttention dispatches)."""
        N, dn = s.condition.shape[:2]
        mask = s.caption_mask.bool()
        y_flat = s.y_xattn[mask]  # valid caption tokens of every (sample, chunk) row, row-major
        lengths = mask.sum(-1).tolist()
        dispatched = self._dispatched(self_ranges)
        if dispatched is not None:
            if kv_hook is not None:
                raise ValueError("a KV cache runs with Ulysses context parallel (parallel.cp_impl=ulysses), not with "
                                 "MagiAttention's dispatch")
            total = dispatched.S
        else:
            total = s.rows.shape[1] if s.rows is not None else s.h.shape[0] * self._split_factor()
        rows = s.rows if s.rows is not None else dense_rows(N, dn, total // dn, s.h.device)
        if dispatched is not None:
            stream_rows = dispatched.rows(rows, stream=True)[:, None]  # (L, 1)
            query_rows = dispatched.rows(rows, stream=False)
        else:
            window = self._window(total)
            stream_rows = rows[:, window.start: window.start + window.length].t()  # (S_local, N)
            # Attention's queries: the cp slice, numbered batch-major (b * cp_length + s - cp_start).
            query_rows = rows[:, window.cp_start: window.cp_start + window.cp_length].reshape(-1)
        # Each token takes its chunk row's condition (padding any row: its outputs are never used).
        condition_map = stream_rows.clamp(min=0)
        cross_ranges = caption_ranges(query_rows, lengths)
        h = s.h
        for layer in self.videodit_blocks.layers:
            h = self._layer(layer, h, s.condition, condition_map, s.sin, s.cos, self_ranges, y_flat, cross_ranges, kv_hook)
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
        h = self.videodit_blocks.final_layernorm(h.float())
        out = self.final_linear(h)
        # All tokens on every rank; the backward keeps each rank's own slice.
        if self.sequence_parallel:
            out = gather_tokens(out, self.tp_group)
        dispatched = self._dispatched(placement)
        return dispatched.gather(out) if dispatched is not None else gather_tokens(out, self.cp_group)

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
              **stage) -> VideoDiT:
    """Build the DiT with the configured layer spec. `device="meta"` builds shapes only.

    Without `tp_group`, a single-process job gets a one-rank group (see `default_tp_group`). `stage` passes
    the parallel keywords of `VideoDiT` (cp_group, sequence_parallel, layer_ids, pre/post_process, init_seed)."""
    spec = get_layer_spec(cfg.layer_spec, cfg.attention_backend)
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            return VideoDiT(cfg, spec, tp_group, init_weights=False, **stage)
    if tp_group is None:
        tp_group = default_tp_group()
    model = VideoDiT(cfg, spec, tp_group, init_weights=init_weights, **stage)
    return model if device is None else model.to(device)


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
