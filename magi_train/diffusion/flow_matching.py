"""Rectified-flow training target of MAGI-1: x_t = (1 - t) noise + t x, v* = x - noise, per chunk."""

from __future__ import annotations

import torch


def chunk_times_to_frames(t: torch.Tensor, frames_per_chunk: int) -> torch.Tensor:
    """(N, chunks) -> (N, 1, chunks * frames, 1, 1), broadcastable over a latent video (N, C, T, H, W)."""
    return t.repeat_interleave(frames_per_chunk, dim=1)[:, None, :, None, None]


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, frames_per_chunk: int) -> torch.Tensor:
    tt = chunk_times_to_frames(t, frames_per_chunk).to(x.dtype)
    return (1 - tt) * noise + tt * x


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return x - noise


def masked_mse(pred: torch.Tensor, target: torch.Tensor, chunk_weight: torch.Tensor, frames_per_chunk: int) -> torch.Tensor:
    """Mean squared error over the chunks whose weight is 1 (noisy chunks); clean context chunks carry 0.

    pred/target (N, C, T, H, W); chunk_weight (N, chunks). Every counted element has equal weight.
    """
    w = chunk_times_to_frames(chunk_weight.float(), frames_per_chunk)
    err = (pred.float() - target.float()).square() * w
    count = w.expand_as(err).sum()
    if count == 0:
        raise ValueError("masked_mse: no noisy chunk in the batch (all chunks are clean context)")
    return err.sum() / count
