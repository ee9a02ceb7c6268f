"""Analytic FLOP count of the MAGI-1 DiT (magi_train/model), for MFU.

Conventions:
- A matmul of [m, k] x [k, n] is 2*m*k*n FLOPs (one multiply and one add per term); a convolution whose
  stride equals its kernel (the patch embedding) is the same matmul over the patches.
- Only matmuls are counted: norms, softmax, RoPE, SiLU/GELU/SwiGLU gating, the adaLN gate multiply-adds and
  other elementwise work are not (they are a few percent at most, and no peak-FLOPs figure covers them).
- The count is the model's, at tensor parallel size 1: work that a parallel layout repeats (KV heads
  replicated when tp > num_query_groups, embedders replicated on every rank) is not counted twice.
- Attention counts only the area the mask lets through. Self-attention is block-causal within a sample:
  a token of chunk i attends to the tokens of chunks 0..i (`block_causal_ranges` / `row_block_causal_ranges`),
  so one head costs 2 * d * sum_i q_i * (q_0 + ... + q_i) for the scores and as much for the values. Each
  chunk's tokens cross-attend to the valid tokens of that chunk's own caption row (`caption_ranges`).
- Padding is not work: caption rows padded to data.caption_length / model.caption_max_length, and the padding
  tokens and rows of a packed sequence, are projected by the model but not counted here (the torch attention
  kernel never touches them; the caption projection does, see tests/unit/test_flops.py for the exact gap).
- Training = 3 x forward (the backward pass computes input and weight gradients, 2 x forward). Activation
  recompute re-runs forward work, which is not counted: this is model FLOPs utilisation (MFU), not hardware
  FLOPs utilisation (HFU). The backward pass skips the input gradients of the embedders fed with data
  (patches, timestep features, caption features), so 3 x forward overcounts by those few matmuls.

Per layer, with S video tokens, R chunks of c_i tokens, T caption tokens per chunk row, h query heads,
g KV heads of width d, hidden H, condition width Dc, ffn width F:

    linear:          2 S H (h d + 2 g d + h d) + 2 S (2 h d) H + 2 S H F (x2 if SwiGLU) + 2 S F H
                     (q, k, v, cross-attention q, linear_proj over [self | cross], fc1, fc2)
    caption_kv:      2 (R T) Hx (2 g d)                 linear_kv_xattn on every chunk row's caption tokens
    adaln:           2 R Dc (2 Hg)                      ada_modulate_layer, one condition per chunk
    self_attention:  4 h d sum_i c_i (c_0 + ... + c_i)
    cross_attention: 4 h d S T
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

from magi_train.config.schema import ModelConfig

# Width of the sinusoidal timestep features (TimestepEmbedder's frequency_size as VideoDiT builds it).
TIMESTEP_FEATURES = 256


@dataclass(frozen=True)
class SampleShape:
    """One training sample as the model sees it."""

    chunk_tokens: Tuple[int, ...]  # video tokens of each chunk of one sample (after patchify), in order
    # Valid caption tokens of each chunk's caption row: every chunk has its own row (the sample's caption
    # repeated, or the null caption's null_caption_length rows when dropped) and cross-attends to it.
    caption_tokens: int

    def __post_init__(self) -> None:
        if not self.chunk_tokens or any(c <= 0 for c in self.chunk_tokens):
            raise ValueError(f"SampleShape.chunk_tokens must be positive token counts, got {self.chunk_tokens}")
        if self.caption_tokens < 0:
            raise ValueError(f"SampleShape.caption_tokens must be >= 0, got {self.caption_tokens}")

    @property
    def tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def chunks(self) -> int:
        return len(self.chunk_tokens)


def block_causal_area(chunk_tokens: Sequence[int]) -> int:
    """(query, key) pairs of block-causal attention: sum_i c_i * (c_0 + ... + c_i)."""
    area, seen = 0, 0
    for c in chunk_tokens:
        seen += c
        area += c * seen
    return area


def _widths(cfg: ModelConfig) -> Dict[str, int]:
    H = cfg.hidden_size
    return dict(
        H=H,
        q=cfg.num_attention_heads * cfg.kv_channels,  # query / attention-output width
        kv=cfg.num_query_groups * cfg.kv_channels,  # GQA: one K (or V) width
        hx=int(H * cfg.xattn_cond_hidden_ratio),  # projected caption width
        cond=int(H * cfg.cond_hidden_ratio),  # timestep / adaLN condition width
        gate=int(H * cfg.cond_gating_ratio),
        fc1=(2 if cfg.gated_linear_unit else 1) * cfg.ffn_hidden_size,  # SwiGLU: [gate | up]
        patch_in=cfg.in_channels * cfg.t_patch_size * cfg.patch_size ** 2,
        patch_out=cfg.out_channels * cfg.t_patch_size * cfg.patch_size ** 2,
    )


def flops_breakdown(cfg: ModelConfig, sample: SampleShape) -> Dict[str, int]:
    """Forward FLOPs of one sample by component (whole model, all layers); the values sum to `forward_flops`.

    embed: patch embedding, timestep embedder (one time per chunk), caption projections (the caption tokens of
    every chunk row, and one adaLN null-caption row per sample as the dense path runs it; a packed sequence
    runs one per row); adaln: the per-layer gate linears;
    linear: q, k, v, cross q, linear_proj and the MLP; caption_kv: the per-layer caption K/V projection;
    self_attention / cross_attention: scores and values of the core attention; head: the final linear."""
    w = _widths(cfg)
    H, L = w["H"], cfg.num_layers
    S, R, T = sample.tokens, sample.chunks, sample.caption_tokens
    caption_rows = R * T  # caption tokens summed over the chunk rows
    timestep_mlp = 2 * TIMESTEP_FEATURES * w["cond"] + 2 * w["cond"] * w["cond"]  # per chunk
    embed = (
        2 * S * w["patch_in"] * H  # x_embedder
        + R * timestep_mlp * (2 if cfg.distill else 1)  # t_embedder (+ the step-size embedding when distilled)
        + 2 * caption_rows * cfg.caption_channels * w["hx"]  # y_proj_xattn
        + 2 * cfg.caption_channels * w["cond"]  # y_proj_adaln: one null-caption row per sample
    )
    per_token_linear = (
        2 * H * (2 * w["q"] + 2 * w["kv"])  # q, qx, k, v
        + 2 * (2 * w["q"]) * H  # linear_proj of [self | cross] heads
        + 2 * H * w["fc1"] + 2 * cfg.ffn_hidden_size * H  # MLP
    )
    attention_per_pair = 4 * cfg.num_attention_heads * cfg.kv_channels  # q.k and p.v per (query, key) pair
    return {
        "embed": embed,
        "adaln": L * R * 2 * w["cond"] * 2 * w["gate"],
        "linear": L * S * per_token_linear,
        "caption_kv": L * caption_rows * 2 * w["hx"] * 2 * w["kv"],
        "self_attention": L * attention_per_pair * block_causal_area(sample.chunk_tokens),
        "cross_attention": L * attention_per_pair * S * T,
        "head": 2 * S * H * w["patch_out"],
    }


def forward_flops(cfg: ModelConfig, sample: SampleShape) -> int:
    """One forward of one sample through the whole model (all layers, all tensor-parallel ranks together)."""
    return sum(flops_breakdown(cfg, sample).values())


def train_flops(cfg: ModelConfig, samples: Sequence[SampleShape]) -> int:
    """Model FLOPs of a training step over `samples`: 3 x forward (recompute not counted)."""
    return 3 * sum(forward_flops(cfg, s) for s in samples)


def mfu(flops: float, seconds: float, num_devices: int, peak_flops_per_device: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the devices' combined peak."""
    if seconds <= 0 or num_devices <= 0 or peak_flops_per_device <= 0:
        raise ValueError(f"mfu needs positive seconds, devices and peak (got {seconds}, {num_devices}, "
                         f"{peak_flops_per_device})")
    return flops / (seconds * num_devices * peak_flops_per_device)
