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

from typing import Optional

import torch
from einops import rearrange
from torch import nn

from magi_train.config.schema import ModelConfig
from magi_train.model.attention import AttnRanges, segment_ranges
from magi_train.model.embedders import CaptionEmbedder, FinalLinear, TimestepEmbedder
from magi_train.model.layers import KVHook, TransformerLayer
from magi_train.model.norms import LayerNorm1p
from magi_train.model.rope import LearnableRope3D, split_table
from magi_train.model.spec import DiTLayerSpec, LinearFactory, get_layer_spec, megatron_config, normal_init, scaled_init_std
from magi_train.parallel.groups import default_tp_group

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Modules kept in fp32 whatever the model dtype (the released `_high_precision_promoter` list).
FP32_MODULES = ("x_embedder", "t_embedder", "y_embedder", "final_linear", "rope", "q_layernorm", "k_layernorm",
                "self_attn_post_norm", "mlp_post_norm", "final_layernorm")


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, linears: LinearFactory, core_attention, dtype: torch.dtype):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg, linears, core_attention, i, dtype) for i in range(cfg.num_layers))
        self.final_layernorm = LayerNorm1p(cfg.hidden_size, cfg.layernorm_epsilon, cfg.apply_layernorm_1p, torch.float32)


class VideoDiT(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: DiTLayerSpec, tp_group: Optional[torch.distributed.ProcessGroup] = None,
                 init_weights: bool = True):
        super().__init__()
        self.cfg = cfg
        self.dtype = DTYPES[cfg.params_dtype]
        H = cfg.hidden_size
        cond_size = int(H * cfg.cond_hidden_ratio)
        tp_size = 1 if tp_group is None else tp_group.size()
        linears = LinearFactory(spec, megatron_config(self.dtype, tp_size, init_weights), normal_init(cfg.init_std),
                                normal_init(scaled_init_std(cfg.init_std, cfg.num_layers)), tp_group)
        patch = (cfg.t_patch_size, cfg.patch_size, cfg.patch_size)

        self.x_embedder = nn.Conv3d(cfg.in_channels, H, kernel_size=patch, stride=patch, bias=False)
        self.t_embedder = TimestepEmbedder(cond_size, 256, cfg.timestep_rescale_factor, feature_dtype=self.dtype)
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, int(H * cfg.xattn_cond_hidden_ratio), cond_size, cfg.caption_max_length)
        self.rope = LearnableRope3D(H // cfg.num_attention_heads, cfg.rope_temperature, cfg.rope_reference_tokens)
        self.videodit_blocks = TransformerBlock(cfg, linears, spec.core_attention, self.dtype)
        self.final_linear = FinalLinear(H, cfg.t_patch_size * cfg.patch_size**2 * cfg.out_channels)
        if init_weights:
            self._init_replicated_weights()

    @torch.no_grad()
    def _init_replicated_weights(self) -> None:
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and "final_linear" not in name:
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.x_embedder.weight.shape[0], -1))
        nn.init.normal_(self.y_embedder.null_caption_embedding, 0.0, std)
        # Zero output layer: the untrained model predicts zero velocity (standard DiT practice).
        nn.init.zeros_(self.final_linear.linear.weight)

    # ------------------------------------------------------------------ forward
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
        tokens_per_chunk = (T // dn) * Hp * Wp
        sin, cos = split_table(self.rope.table(T, Hp, Wp, frame_offset=(T // dn) * slice_point))

        t_flat = t.flatten().float()
        t_emb = self.t_embedder(t_flat)
        if cfg.distill:
            if distill_dt is None:
                raise ValueError("a distilled model (model.distill=true) needs distill_dt (the step-size embedding input)")
            t_emb = t_emb + self.t_embedder(torch.full_like(t_flat, float(distill_dt)))
        if adaln_uncond is None:
            adaln_uncond = torch.zeros(N, dtype=torch.bool, device=x.device)
        if adaln_uncond.shape not in ((N,), (N, dn)):
            raise ValueError(f"adaln_uncond has shape {tuple(adaln_uncond.shape)}; expected ({N},) or ({N}, {dn})")
        y_xattn, y_adaln = self.y_embedder(caption.float(), adaln_uncond)
        condition = t_emb.reshape(N, dn, -1) + y_adaln  # (N, dn, Dc)

        # Token s of sample b takes the condition of its chunk: row b*dn + s // tokens_per_chunk.
        condition_map = torch.arange(N * dn, device=x.device).repeat_interleave(tokens_per_chunk).reshape(N, -1).t()
        mask = caption_mask.bool()
        y_flat = y_xattn[mask]  # valid caption tokens of every (sample, chunk) row, row-major
        cross_ranges = segment_ranges([tokens_per_chunk] * (N * dn), mask.sum(-1).tolist())

        h = rearrange(x.to(self.dtype), "n c t h w -> (t h w) n c").contiguous()
        condition = condition.to(self.dtype)
        y_flat = y_flat.to(self.dtype)
        for layer in self.videodit_blocks.layers:
            h = layer(h, condition, condition_map, sin, cos, self_ranges, y_flat, cross_ranges, kv_hook)
        h = self.videodit_blocks.final_layernorm(h.float())
        out = self.final_linear(h)
        out = rearrange(out, "(t h w) n (pt ph pw c) -> n c (t pt) (h ph) (w pw)", t=T, h=Hp, w=Wp,
                        pt=cfg.t_patch_size, ph=cfg.patch_size, pw=cfg.patch_size)
        if cfg.half_channel_vae:
            out = out[:, : cfg.out_channels // 2]
        return out / cfg.x_rescale_factor

    # ------------------------------------------------------------------ helpers
    def drop_captions(self, caption, caption_mask, dropped_rows):
        return self.y_embedder.drop(caption, caption_mask, dropped_rows, self.cfg.null_caption_length)


def build_dit(cfg: ModelConfig, tp_group=None, init_weights: bool = True, device: Optional[torch.device] = None) -> VideoDiT:
    """Build the DiT with the configured layer spec. `device="meta"` builds shapes only.

    Without `tp_group`, a single-process job gets a one-rank group (see `default_tp_group`)."""
    spec = get_layer_spec(cfg.layer_spec, cfg.attention_backend)
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            return VideoDiT(cfg, spec, tp_group, init_weights=False)
    if tp_group is None:
        tp_group = default_tp_group()
    model = VideoDiT(cfg, spec, tp_group, init_weights=init_weights)
    return model if device is None else model.to(device)


def module_dtype_plan(model: VideoDiT) -> dict:
    """Expected run-time dtype of every parameter: fp32 for the promotion list, model dtype otherwise."""
    plan = {}
    for name, p in model.named_parameters():
        promoted = any(part in FP32_MODULES for part in name.split("."))
        plan[name] = torch.float32 if promoted else model.dtype
    return plan
