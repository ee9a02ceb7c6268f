"""Input and output embedders of the DiT (replicated on every rank, computed in fp32)."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_features(t: torch.Tensor, size: int = 256, rescale: float = 1000.0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1]: [cos(args) | sin(args)] (cos first), args = t * freqs * 1000."""
    half = size // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None] * rescale
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, cond_size: int, frequency_size: int = 256, rescale: float = 1000.0, feature_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.frequency_size = frequency_size
        self.rescale = rescale
        # The released model rounds the features to its params dtype (bf16) before an fp32 MLP; that
        # rounding is part of what its weights were trained with.
        self.feature_dtype = feature_dtype
        self.mlp = nn.Sequential(nn.Linear(frequency_size, cond_size), nn.SiLU(), nn.Linear(cond_size, cond_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(t.float(), self.frequency_size, self.rescale)
        feats = feats.to(self.feature_dtype).to(self.mlp[0].weight.dtype)
        return self.mlp(feats)


class CaptionEmbedder(nn.Module):
    """Caption rows -> cross-attention tokens, plus the adaLN "caption present / dropped" token.

    The prompt reaches the model only through cross-attention: the adaLN input is one of two learned rows
    of `null_caption_embedding` (-2 = caption present, -1 = dropped), as in the released model.
    """

    def __init__(self, caption_channels: int, hidden_size: int, cond_size: int, max_length: int):
        super().__init__()
        self.y_proj_xattn = nn.Sequential(nn.Linear(caption_channels, hidden_size), nn.SiLU())
        self.y_proj_adaln = nn.Sequential(nn.Linear(caption_channels, cond_size))
        self.null_caption_embedding = nn.Parameter(torch.zeros(max_length, caption_channels))

    def forward(self, caption: torch.Tensor, adaln_uncond: torch.Tensor):
        """caption (R, L, Cc); adaln_uncond (N,) per sample or (N, dn) per chunk, bool.
        Returns (R, L, H) and (N, 1 or dn, Dc).

        The per-chunk form exists for inference without a KV cache, where clean context chunks are
        recomputed in the same call and must see the adaLN row they were cached with."""
        caption = caption.to(self.y_proj_xattn[0].weight.dtype)
        y_xattn = self.y_proj_xattn(caption)
        null = self.null_caption_embedding
        flags = adaln_uncond[:, None] if adaln_uncond.ndim == 1 else adaln_uncond
        token = torch.where(flags[..., None], null[None, -1:, :], null[None, -2:-1, :])
        return y_xattn, self.y_proj_adaln(token)

    def drop(self, caption: torch.Tensor, mask: torch.Tensor, dropped: torch.Tensor, null_length: int):
        """Replace the caption rows where `dropped` (R,) by the learned null caption with its `null_length`-row
        mask (training-time caption dropout; differentiable w.r.t. the null caption)."""
        L = caption.shape[1]
        null = self.null_caption_embedding[:L].to(caption.dtype)
        null_mask = torch.arange(L, device=mask.device) < null_length
        caption = torch.where(dropped[:, None, None], null[None], caption)
        mask = torch.where(dropped[:, None], null_mask[None], mask)
        return caption, mask


class FinalLinear(nn.Module):
    def __init__(self, hidden_size: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

