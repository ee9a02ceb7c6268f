"""Attention described by (query range, key range) lists, and the CPU kernels that consume them.

One description serves every use: block-causal training over packed samples, per-chunk cross-attention
to captions, and inference with a KV cache and a lookback window. A slice `i` says: the query tokens
`[q_ranges[i,0], q_ranges[i,1])` attend, without a causal mask, to the key tokens
`[k_ranges[i,0], k_ranges[i,1])`. This is MagiAttention's `q_ranges/k_ranges` (all FULL) and MAGI-1's
`kv_range`; GPU kernels (flash-attn per range, MagiAttention's flex_flash_attn) take the same tensors.

Token coordinates are flat and batch-major: token `s` of sample `b` sits at `b * S + s` (for keys, `S`
includes any cached prefix). Query ranges must not overlap; query tokens that no range covers get zeros
(flash-attn's convention for an empty key set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttnRanges:
    """Slices of a (query, key) attention pattern; both tensors are int64 (n, 2) on the CPU."""

    q_ranges: torch.Tensor
    k_ranges: torch.Tensor
    # What kernels derive from these ranges (a flex BlockMask, flash-attn's varlen indices, auto's choice), by
    # kernel, sizes and device: see `memo`. Not a field of the description (no init, compare or repr).
    _derived: Dict[Hashable, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.q_ranges.shape != self.k_ranges.shape or self.q_ranges.ndim != 2 or self.q_ranges.shape[1] != 2:
            raise ValueError(
                f"AttnRanges needs q_ranges and k_ranges of one shape (n, 2); got {tuple(self.q_ranges.shape)} "
                f"and {tuple(self.k_ranges.shape)}"
            )
        if bool((self.q_ranges[:, 1] < self.q_ranges[:, 0]).any()) or bool((self.k_ranges[:, 1] < self.k_ranges[:, 0]).any()):
            raise ValueError("AttnRanges: every range must have end >= start")
        order = torch.argsort(self.q_ranges[:, 0])
        q = self.q_ranges[order]
        if bool((q[1:, 0] < q[:-1, 1]).any()):
            raise ValueError(f"AttnRanges: query ranges overlap: {self.q_ranges.tolist()}")

    @staticmethod
    def from_lists(q: Sequence[Tuple[int, int]], k: Sequence[Tuple[int, int]]) -> "AttnRanges":
        return AttnRanges(torch.tensor(q, dtype=torch.int64).reshape(-1, 2), torch.tensor(k, dtype=torch.int64).reshape(-1, 2))

    def __len__(self) -> int:
        return int(self.q_ranges.shape[0])

    def memo(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """`build()` once per `key` for this ranges object, then the stored value.

        The DiT hands one AttnRanges object to every layer of a forward (self-attention: the placement's,
        cross-attention: the one `run_layers` builds), so what a kernel derives from it is built once per
        forward, not once per layer, and is dropped with the object after the forward and its backward. The
        ranges are never changed after construction (frozen, and no code writes into the tensors), so a stored
        value cannot go stale. The key must name everything the value depends on besides the ranges (kernel,
        token counts, device)."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def pairs(self) -> List[Tuple[int, int, int, int]]:
        return [tuple(int(v) for v in row) for row in torch.cat([self.q_ranges, self.k_ranges], 1).tolist()]

    def to_mask(self, total_q: int, total_k: int) -> torch.Tensor:
        """Dense boolean mask (total_q, total_k), True = may attend."""
        mask = torch.zeros(total_q, total_k, dtype=torch.bool)
        for qs, qe, ks, ke in self.pairs():
            mask[qs:qe, ks:ke] = True
        return mask


def block_causal_ranges(
    num_samples: int,
    chunks_per_sample: int,
    tokens_per_chunk: int,
    window_chunks: Optional[int] = None,
) -> AttnRanges:
    """MAGI-1's training mask: full attention inside a chunk, causal across the chunks of one sample,
    nothing across samples. `window_chunks` limits the lookback to that many chunks (self included)."""
    if window_chunks is not None and window_chunks < 1:
        raise ValueError(f"window_chunks must be >= 1, got {window_chunks}")
    q, k = [], []
    per_sample = chunks_per_sample * tokens_per_chunk
    for b in range(num_samples):
        base = b * per_sample
        for c in range(chunks_per_sample):
            first = 0 if window_chunks is None else max(0, c + 1 - window_chunks)
            q.append((base + c * tokens_per_chunk, base + (c + 1) * tokens_per_chunk))
            k.append((base + first * tokens_per_chunk, base + (c + 1) * tokens_per_chunk))
    return AttnRanges.from_lists(q, k)


def _runs(values: List[int]):
    """(value, start, end) of each maximal run of equal consecutive values."""
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            yield values[start], start, i
            start = i


def row_block_causal_ranges(token_map: torch.Tensor) -> AttnRanges:
    """Block-causal ranges of packed sequences from their token map (N, S, 2) = [caption row, sample] per
    token (-1 for padding), rows contiguous and in chunk order within a sample: each chunk's tokens attend
    to their sample's tokens up to the end of that chunk. Coordinates are flat, batch-major (b * S + s)."""
    N, S, _ = token_map.shape
    q, k = [], []
    flat = token_map.reshape(N * S, 2).to(torch.int64)
    rows = flat[:, 0].tolist()
    samples = flat[:, 1].tolist()
    sample_start = {}
    for row, start, end in _runs(rows):
        if row < 0:
            continue
        key = (start // S, samples[start])  # a sample never spans two packed sequences
        first = sample_start.setdefault(key, start)
        q.append((start, end))
        k.append((first, end))
    return AttnRanges.from_lists(q, k)


def caption_ranges(rows: torch.Tensor, caption_lengths: Sequence[int]) -> AttnRanges:
    """Cross-attention: each run of consecutive query tokens of one caption row (rows: (T,) int, -1 = no
    row) attends to that row's valid caption tokens; keys are all rows' valid tokens, row-major."""
    offsets = [0]
    for length in caption_lengths:
        offsets.append(offsets[-1] + int(length))
    q, k = [], []
    for row, start, end in _runs(rows.tolist()):
        if row >= 0 and offsets[row + 1] > offsets[row]:
            q.append((start, end))
            k.append((offsets[row], offsets[row + 1]))
    return AttnRanges.from_lists(q, k)


def segment_ranges(q_lengths: Sequence[int], k_lengths: Sequence[int]) -> AttnRanges:
    """Consecutive query segments each attending to its own consecutive key segment (varlen cross-attn)."""
    if len(q_lengths) != len(k_lengths):
        raise ValueError(f"segment_ranges: {len(q_lengths)} query segments vs {len(k_lengths)} key segments")
    q_end = torch.tensor(list(q_lengths), dtype=torch.int64).cumsum(0)
    k_end = torch.tensor(list(k_lengths), dtype=torch.int64).cumsum(0)
    q = torch.stack([q_end - torch.tensor(list(q_lengths)), q_end], 1)
    k = torch.stack([k_end - torch.tensor(list(k_lengths)), k_end], 1)
    return AttnRanges(q, k)


def _expand_kv_heads(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    # GQA (flash-attn convention): query head h reads KV head h // (nq / nkv).
    group = num_q_heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def softmax_scale(head_dim: int) -> float:
    """flash-attn's default softmax_scale, which the released model uses: head_dim ** -0.5."""
    return head_dim ** -0.5


def range_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ranges: AttnRanges) -> torch.Tensor:
    """Exact reference kernel: for every slice, fp32 softmax(q kᵀ * d**-0.5) v, rounded to q's dtype.

    q: (Tq, Hq, D); k, v: (Tk, Hkv, D). Returns (Tq, Hq, D). This mirrors what flash-attn computes per
    range (fp32 accumulation, one rounding of the output), so it reproduces the released model on CPU.
    """
    tq, hq, d = q.shape
    # The released op order (flash-attn's softmax_scale): scores multiplied by d**-0.5 (cast to fp32 by
    # the fp32 product), not divided by sqrt(d); the two differ in the last bit for d = 128.
    scale = softmax_scale(d)
    out = q.new_zeros(tq, hq, d)
    for qs, qe, ks, ke in ranges.pairs():
        if qe == qs or ke == ks:
            continue
        qi = q[qs:qe].float().transpose(0, 1)  # (H, sq, D)
        ki = _expand_kv_heads(k[ks:ke], hq).float().transpose(0, 1)
        vi = _expand_kv_heads(v[ks:ke], hq).float().transpose(0, 1)
        probs = torch.softmax(torch.matmul(qi, ki.transpose(1, 2)) * scale, dim=-1)
        out[qs:qe] = torch.matmul(probs, vi).transpose(0, 1).to(q.dtype)
    return out


# The largest dense mask `sdpa` builds: 256 Mi booleans (16k x 16k tokens). A 64k-token sample would need 4 GiB
# before any score; `flex` (model/flex.py) keeps the same pattern in O(tiles) memory.
SDPA_MAX_MASK_ELEMENTS = 2**28


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ranges: AttnRanges) -> torch.Tensor:
    """One masked scaled-dot-product call over all slices (faster on CPU for training, same maths)."""
    tq, hq, d = q.shape
    if tq * k.shape[0] > SDPA_MAX_MASK_ELEMENTS:
        raise ValueError(f"model.attention_backend=sdpa would build a dense {tq} x {k.shape[0]} mask "
                         f"({tq * k.shape[0] / 2**30:.1f} GiB), more than its limit of {SDPA_MAX_MASK_ELEMENTS} "
                         f"elements; use model.attention_backend=flex (memory O(tiles)) or torch")
    mask = ranges.to_mask(tq, k.shape[0]).to(q.device)
    covered = mask.any(-1)
    # Rows without keys would be NaN in softmax; give them a dummy key and zero them afterwards.
    mask[~covered, 0] = True
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1),
        _expand_kv_heads(k, hq).float().transpose(0, 1),
        _expand_kv_heads(v, hq).float().transpose(0, 1),
        attn_mask=mask,
        scale=softmax_scale(d),
    ).transpose(0, 1)
    out = out * covered[:, None, None]
    return out.to(q.dtype)


ATTENTION_BACKENDS = {"torch": range_attention, "sdpa": sdpa_attention}
