"""FlexAttention as the DiT's core attention (`model.attention_backend: flex`): memory bounded on any device.

The pattern is an `AttnRanges` (model/attention.py). It becomes a `BlockMask` straight from block indices, never
through a dense T x T mask. At 65,536 tokens a dense boolean mask is 4 GiB, and `create_block_mask` without
compilation materialises one first. For 128 x 128 tiles this keeps:

    kv_num_blocks / kv_indices            the tiles a query block touches only in part: a mask_mod decides
    full_kv_num_blocks / full_kv_indices  the tiles every query of the block sees whole: no mask_mod
    q_start / q_end                       per query token, the one key range it attends to (-1: none)

Memory is O(T / 128)^2 for the tile lists plus O(T) for the per-token ranges; a 64k-token sample is a few MiB.
A query that no range covers gets zeros, as in the other backends (flex returns 0 for a fully masked row).
The mask is built once per ranges object and device (`AttnRanges.memo`): every layer of a forward shares it.

On CUDA the kernel is `torch.compile(flex_attention)` (the fused, memory-bounded kernel). Elsewhere torch runs
flex eagerly, which scores densely per call: right for CPU tests, not for long sequences. torch 2.13 has no
flex backward on the CPU, so CPU tests check the forward against the exact `torch` backend and the GPU tests
check the gradients.
"""

from __future__ import annotations

import functools
import warnings
from typing import Tuple

import torch

from magi_train.model.attention import AttnRanges, softmax_scale

BLOCK = 128  # flex's tile size (queries and keys)


def _tile_lists(tiles: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(nq, nk) bool -> (1, 1, nq) counts and (1, 1, nq, nk) int32 tile indices, the marked ones first."""
    counts = tiles.sum(-1, dtype=torch.int32)
    # A stable sort on "not marked" puts each row's marked tile indices first, in increasing order.
    order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[None, None].contiguous(), order[None, None].contiguous()


def ranges_block_mask(ranges: AttnRanges, total_q: int, total_k: int, device=None):
    """The BlockMask of `ranges` over `total_q` query and `total_k` key tokens, built from tile indices."""
    from torch.nn.attention.flex_attention import BlockMask

    nq, nk = -(-total_q // BLOCK), -(-total_k // BLOCK)
    q_start = torch.full((nq * BLOCK,), -1, dtype=torch.int64)
    q_end = torch.full((nq * BLOCK,), -1, dtype=torch.int64)
    touched = torch.zeros(nq, nk, dtype=torch.bool)
    for qs, qe, ks, ke in ranges.pairs():
        if qe > qs and ke > ks:
            q_start[qs:qe], q_end[qs:qe] = ks, ke
            touched[qs // BLOCK:(qe - 1) // BLOCK + 1, ks // BLOCK:(ke - 1) // BLOCK + 1] = True
    # A tile is whole when every query of its block (padding included, which has no range) sees all its keys.
    rows = q_start.view(nq, BLOCK)
    covered = (rows >= 0).all(-1)
    latest_start = rows.max(-1).values
    earliest_end = torch.where(q_end.view(nq, BLOCK) >= 0, q_end.view(nq, BLOCK), 0).min(-1).values
    tile_start = torch.arange(nk, dtype=torch.int64) * BLOCK
    tile_end = torch.clamp(tile_start + BLOCK, max=total_k)
    whole = (covered[:, None] & (tile_start[None] >= latest_start[:, None]) & (tile_end[None] <= earliest_end[:, None])
             & (tile_end[None] - tile_start[None] == BLOCK))
    partial = touched & ~whole
    q_start, q_end = q_start.to(device), q_end.to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= q_start[q_idx]) & (kv_idx < q_end[q_idx])

    kv_num, kv_idx = _tile_lists(partial)
    full_num, full_idx = _tile_lists(whole)
    return BlockMask.from_kv_blocks(kv_num.to(device), kv_idx.to(device), full_num.to(device), full_idx.to(device),
                                    BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(total_q, total_k))


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _kernel(device: torch.device):
    if device.type == "cuda":
        return _compiled_flex()
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def flex_range_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ranges: AttnRanges) -> torch.Tensor:
    """softmax(q kᵀ * d**-0.5) v over `ranges`, accumulated in fp32, rounded to q's dtype. q: (Tq, Hq, D);
    k, v: (Tk, Hkv, D), Hkv dividing Hq (GQA: query head h reads KV head h // (Hq / Hkv), as the other backends)."""
    tq, hq, d = q.shape
    tk = k.shape[0]
    # Every layer of a forward gets the same ranges object: one BlockMask per forward, not one per layer.
    mask = ranges.memo(("flex-block-mask", tq, tk, str(q.device)),
                       lambda: ranges_block_mask(ranges, tq, tk, q.device))
    # The fused CUDA kernel takes bf16 as it is and accumulates in fp32 (flash-attn's contract); the eager path
    # computes in its inputs' dtype, so it gets fp32.
    compute = q.dtype if q.device.type == "cuda" else torch.float32
    as_bhsd = lambda x: x.to(compute).transpose(0, 1)[None]  # noqa: E731 - (T, H, D) -> (1, H, T, D)
    with warnings.catch_warnings():
        # Eager flex (CPU) warns that it is unfused; that is known and intended there (see the docstring).
        warnings.filterwarnings("ignore", message=".*flex_attention.*")
        out = _kernel(q.device)(as_bhsd(q), as_bhsd(k), as_bhsd(v), block_mask=mask, scale=softmax_scale(d),
                                enable_gqa=k.shape[1] != hq)
    return out[0].transpose(0, 1).to(q.dtype)
