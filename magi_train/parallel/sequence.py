"""Splitting the token sequence over ranks: context parallel (Ulysses) and sequence parallel, as the
`UlyssesLayout` token layout that `parallelize_dit` gives the model (magi_train/model/layout.py).

Conventions (sequence-first activations (S, N, ...), token s of a sample is global position s):
- A rank keeps the tokens of its `TokenWindow`. Context parallel rank c holds [c*S/cp, (c+1)*S/cp);
  with sequence parallel, tensor-parallel rank t holds the t-th of tp equal parts of that.
- Splitting is a plain `narrow` (its backward pads with zeros), and the final gather's backward keeps
  only the local slice. Gradients of everything computed before the split or after the gather are
  therefore *partial* on each rank and summed over the ranks that split the sequence (the trainer does
  that), which is exact whatever the loss.
- Ulysses: inside attention every context-parallel rank trades its token slice of all heads for all
  tokens of 1/cp of the heads (one all-to-all there, one back), so any attention kernel sees whole
  sequences and the block-causal ranges stay global.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TokenWindow:
    start: int  # first global token of this rank, per sample
    length: int  # tokens of this rank, per sample
    cp_start: int  # first token of the context-parallel slice (what attention's queries cover)
    cp_length: int

    @staticmethod
    def of(total: int, cp_rank: int, cp: int, tp_rank: int, tp_split: int) -> "TokenWindow":
        if total % (cp * tp_split):
            raise ValueError(f"{total} tokens per sample do not split into cp x sequence-parallel tp = {cp} x {tp_split} "
                             f"equal parts")
        cp_len = total // cp
        length = cp_len // tp_split
        return TokenWindow(cp_rank * cp_len + tp_rank * length, length, cp_rank * cp_len, cp_len)


class _GatherTokens(torch.autograd.Function):
    """All-gather along dim 0 in group-rank order; the backward keeps this rank's slice (no communication)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        size = dist.get_world_size(group)
        ctx.rank, ctx.length = dist.get_rank(group), x.shape[0]
        out = x.new_empty((size * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.narrow(0, ctx.rank * ctx.length, ctx.length), None


def gather_tokens(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _GatherTokens.apply(x, group)


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(N, S/cp, h, d) token slice of all heads -> (N, S, h/cp, d) all tokens of this rank's heads."""
    from magi_train.mcore import all_to_all  # megatron-core only where context parallelism communicates

    cp = dist.get_world_size(group)
    N, s, h, d = x.shape
    send = x.reshape(N, s, cp, h // cp, d).permute(2, 0, 1, 3, 4).contiguous()  # (cp, N, s, h/cp, d)
    recv = all_to_all(group, send.reshape(cp * N * s, h // cp * d))
    # recv block j holds source rank j's tokens: concatenate them in rank order along the sequence.
    return recv.reshape(cp, N, s, h // cp, d).permute(1, 0, 2, 3, 4).reshape(N, cp * s, h // cp, d)


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Inverse of `seq_to_heads`: (N, S, h/cp, d) -> (N, S/cp, h, d)."""
    from magi_train.mcore import all_to_all  # megatron-core only where context parallelism communicates

    cp = dist.get_world_size(group)
    N, S, hl, d = x.shape
    s = S // cp
    send = x.reshape(N, cp, s, hl, d).permute(1, 0, 2, 3, 4).contiguous()  # block j = tokens of rank j
    recv = all_to_all(group, send.reshape(cp * N * s, hl * d))
    return recv.reshape(cp, N, s, hl, d).permute(1, 2, 0, 3, 4).reshape(N, s, cp * hl, d)


def replicate_kv_heads(x: torch.Tensor, cp: int) -> torch.Tensor:
    """With fewer KV heads than context-parallel ranks, give every rank a copy of the KV head its query
    heads read (GQA: query head j reads KV head j // (hq / hkv))."""
    heads = x.shape[2]
    if heads >= cp:
        return x
    return x.repeat_interleave(cp // heads, dim=2)


class UlyssesPlacement:
    """One forward's tokens under Ulysses context parallel and/or sequence parallel (see the module docstring)."""

    supports_kv_cache = True

    def __init__(self, layout: "UlyssesLayout", ranges, N: int, S: int):
        self.layout, self.attn_ranges, self.N, self.tokens = layout, ranges, N, S
        self.window = TokenWindow.of(S, layout.cp_rank, layout.cp, layout.tp_rank, layout.split)

    def split(self, h: torch.Tensor) -> torch.Tensor:
        w = self.window
        return h.narrow(0, w.start, w.length).contiguous()

    def rope(self, table: torch.Tensor) -> torch.Tensor:
        w = self.window
        return table.narrow(0, w.cp_start, w.cp_length)

    def stream_rows(self, rows: torch.Tensor) -> torch.Tensor:
        w = self.window
        return rows[:, w.start: w.start + w.length].t()  # (S_local, N)

    def query_rows(self, rows: torch.Tensor) -> torch.Tensor:
        # Attention's queries: the cp slice, numbered batch-major (b * cp_length + s - cp_start).
        w = self.window
        return rows[:, w.cp_start: w.cp_start + w.cp_length].reshape(-1)

    def to_heads(self, q, k, v):
        group = self.layout.cp_group
        if group is None:
            return q, k, v
        cp = self.layout.cp
        k, v = replicate_kv_heads(k, cp), replicate_kv_heads(v, cp)
        return tuple(seq_to_heads(t, group) for t in (q, k, v))

    def from_heads(self, out: torch.Tensor) -> torch.Tensor:
        group = self.layout.cp_group
        return out if group is None else heads_to_seq(out, group)

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        if self.layout.sp_group is not None:
            out = gather_tokens(out, self.layout.sp_group)
        return gather_tokens(out, self.layout.cp_group)

    def stream_shape(self):
        w = self.window
        return (w.length, self.N), w.cp_length


class UlyssesLayout:
    """Contiguous token windows: cp rank c holds [c*S/cp, (c+1)*S/cp) of every sample; with sequence parallel
    (`sp_group`: the TP group) TP rank t holds the t-th of tp parts of that. `cp_group` None: no context parallel."""

    def __init__(self, cp_group: Optional[dist.ProcessGroup], sp_group: Optional[dist.ProcessGroup] = None):
        self.cp_group = cp_group if cp_group is not None and cp_group.size() > 1 else None
        self.sp_group = sp_group if sp_group is not None and sp_group.size() > 1 else None
        self.cp = 1 if self.cp_group is None else self.cp_group.size()
        self.cp_rank = 0 if self.cp_group is None else self.cp_group.rank()
        self.split = 1 if self.sp_group is None else self.sp_group.size()
        self.tp_rank = 0 if self.sp_group is None else self.sp_group.rank()

    def place(self, ranges, N: int, S: int) -> UlyssesPlacement:
        return UlyssesPlacement(self, ranges, N, S)
