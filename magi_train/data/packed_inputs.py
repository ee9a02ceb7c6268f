"""Model inputs of one packed sequence: samples of any size and length side by side in `seq_length` tokens.

Every sample keeps its own grid: its tokens are its latent's patches in (t h w) order, its RoPE coordinates
are those of its own grid (`rope_coords`), its chunks are caption/condition rows of their own, and attention
is block-causal inside the sample only (`row_block_causal_ranges` of the token map). Padding tokens belong
to no row and carry zero loss weight. See `VideoDiT.forward_packed` for the tensors' meaning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from einops import rearrange

from magi_train.config.schema import ModelConfig
from magi_train.model.rope import rope_coords


def patchify(latent: torch.Tensor, t_patch: int, patch: int) -> torch.Tensor:
    """(C, T, H, W) -> (T/pt * H/p * W/p, C*pt*p*p): tokens in (t h w) order, channel-major inside a patch
    (the order of the x_embedder Conv3d kernel)."""
    return rearrange(latent, "c (t pt) (h ph) (w pw) -> (t h w) (c pt ph pw)", pt=t_patch, ph=patch, pw=patch)


@dataclass
class PackedItem:
    """One sample of a packed sequence, as the training objective prepared it."""

    x_t: torch.Tensor  # (C, T, H, W) model input (noisy chunks, clean context)
    target: torch.Tensor  # (C, T, H, W) velocity target
    frame_weight: torch.Tensor  # (T,) loss weight of each latent frame (0: clean context / i2v frame)
    t: torch.Tensor  # (chunks,) time of each chunk
    caption: torch.Tensor  # (chunks, L, Cc) one row per chunk
    caption_mask: torch.Tensor  # (chunks, L)
    null_rows: torch.Tensor  # (chunks,) bool: row replaced by the learned null caption
    adaln_uncond: torch.Tensor  # (chunks,) bool: adaLN "caption dropped" flag
    # (T, H, W) loss weight of each latent position on top of its frame's (diffusion.motion_weight), or None.
    position_weight: Optional[torch.Tensor] = None


def pack_inputs(items: List[PackedItem], cfg: ModelConfig, seq_length: int, max_rows: int, weight_scale: float = 1.0):
    """(inputs of `VideoDiT.forward_packed` before caption dropout, target (1, P + 1, S)).

    inputs = (patches (1, S, P), t (1, R), caption (R, L, Cc), caption_mask (R, L), null_rows (R,),
    adaln_uncond (1, R), coords (1, S, 3), token_map (1, S, 2)); target = [v* patches | weight] channels
    first, the weight already multiplied by `weight_scale` (1 / the global count of loss elements)."""
    pt, p = cfg.t_patch_size, cfg.patch_size
    C = items[0].x_t.shape[0]
    P = C * pt * p * p
    L, Cc = items[0].caption.shape[1:]
    patches = torch.zeros(seq_length, P)
    target = torch.zeros(seq_length, P + 1)
    coords = torch.zeros(seq_length, 3)
    token_map = torch.full((seq_length, 2), -1.0)
    t = torch.zeros(max_rows)
    caption = torch.zeros(max_rows, L, Cc)
    caption_mask = torch.zeros(max_rows, L, dtype=torch.bool)
    null_rows = torch.zeros(max_rows, dtype=torch.bool)
    adaln = torch.zeros(max_rows, dtype=torch.bool)
    pos = row = 0
    for index, item in enumerate(items):
        _, T, H, W = item.x_t.shape
        grid = (T // pt, H // p, W // p)
        n = grid[0] * grid[1] * grid[2]
        chunks = item.t.shape[0]
        if pos + n > seq_length or row + chunks > max_rows:
            raise ValueError(f"packed sequence overflows: sample {index} needs {n} tokens / {chunks} rows at token {pos} "
                             f"/ row {row} of data.seq_length={seq_length} / data.max_rows_per_sequence={max_rows}")
        patches[pos:pos + n] = patchify(item.x_t, pt, p)
        frames = item.frame_weight.repeat_interleave(H * W).reshape(1, T, H, W).expand(C, T, H, W)
        target[pos:pos + n, :P] = patchify(item.target, pt, p)
        # Every element of a patch shares its frame's weight (t_patch frames of one chunk share it).
        weight = patchify(frames.float(), pt, p)[:, 0]
        if item.position_weight is not None:  # a token weighs the mean of its patch's positions
            weight = weight * patchify(item.position_weight[None].float(), pt, p).mean(dim=1)
        target[pos:pos + n, P] = weight * weight_scale
        coords[pos:pos + n] = rope_coords(*grid, cfg.rope_reference_tokens)
        tokens_per_chunk = n // chunks
        token_map[pos:pos + n, 0] = torch.arange(row, row + chunks).repeat_interleave(tokens_per_chunk).float()
        token_map[pos:pos + n, 1] = float(index)
        t[row:row + chunks] = item.t
        caption[row:row + chunks] = item.caption
        caption_mask[row:row + chunks] = item.caption_mask
        null_rows[row:row + chunks] = item.null_rows
        adaln[row:row + chunks] = item.adaln_uncond
        pos, row = pos + n, row + chunks
    inputs = (patches[None], t[None], caption, caption_mask, null_rows, adaln[None], coords[None], token_map[None])
    return inputs, target.t()[None]



def caption_rows(caption: torch.Tensor, lengths: torch.Tensor, chunks: int, length: int):
    """(rows (chunks, length, D), mask (chunks, length)) for a sample's (R, L, D) caption features with R = 1
    (shared by every chunk) or R = chunks. Rows are padded, or cut, to `length` tokens so that every packed
    sequence has the same caption shape (the pipeline's stage boundaries are static)."""
    R, L, D = caption.shape
    if R not in (1, chunks):
        raise ValueError(f"{R} caption rows for {chunks} chunks (must be 1 or one per chunk)")
    rows = torch.zeros(R, length, D)
    keep = min(L, length)
    rows[:, :keep] = caption[:, :keep].float()
    mask = torch.arange(length)[None] < lengths.clamp(max=length)[:, None]
    return rows.expand(chunks, -1, -1), mask.expand(chunks, -1)
