"""Context parallel with MagiAttention's dispatch (`parallel.cp_impl: magi`), the alternative to Ulysses.

Ulysses gives every cp rank one contiguous window of every sample and trades tokens for heads inside
attention. Block-causal attention makes that unbalanced in *work*: the last chunks of a sample see all earlier
chunks. MagiAttention instead cuts the flat, batch-major sequence (the coordinates of `AttnRanges`) into
dispatch chunks and hands each rank a set of them with about the same attention area; its `calc_attn` then
computes the exact global attention for the rank's queries, fetching the remote keys it needs.

Our tokens follow that dispatch through the whole model, not only through attention:

    ids = position_ids(key)         this rank's global token ids, in local order (>= N*S: padding)
    h (N*S, ...) --split-->  (L, 1, H)   residual stream, one flat "sample" of this rank's tokens
    sin / cos, the tokens' caption rows (condition map, cross-attention ranges): looked up from the ids
    self-attention: calc_attn on local q/k/v (no all-to-all; heads are not split)
    head: all-gather every rank's tokens and put them back in global order

The token moves are our own autograd ops with the same gradient convention as Ulysses (sequence.py): the
split's backward scatters into zeros and the gather's backward keeps the local rows, so gradients of
everything before the split are partial per cp rank and summed by the trainer over dp x cp. MagiAttention's
own `dispatch` / `undispatch` are not used for this because their backwards follow a different convention.
Padding tokens carry zeros, sit in no query or key range, and are dropped by the gather.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from magi_train.model.attention import AttnRanges
from magi_train.model.magi_attention import MagiContextParallel


def _select_rows(x: torch.Tensor, ids: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Rows `ids` of x; an id of len(x) or more (padding) gives a row of `fill`."""
    padded = torch.cat([x, x.new_full((1,) + tuple(x.shape[1:]), fill)])
    return padded.index_select(0, ids.clamp(max=x.shape[0]).to(x.device))


class _Scatter(torch.autograd.Function):
    """Rows `ids` of x (padding ids give zero rows); backward adds the rows back into zeros."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.clamp(max=x.shape[0])
        ctx.save_for_backward(ids)
        ctx.rows = x.shape[0]
        return _select_rows(x, ids)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        out = grad.new_zeros((ctx.rows + 1,) + tuple(grad.shape[1:]))
        out.index_add_(0, ids, grad)
        return out[: ctx.rows], None


class _Gather(torch.autograd.Function):
    """Every rank's dispatched rows back in global order: (L, ...) local -> (total, ...) on every rank.

    `all_ids` is the concatenation of every rank's ids in group-rank order (padding: >= total). The backward
    keeps this rank's rows, like `gather_tokens`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ids: torch.Tensor, all_ids: torch.Tensor, total: int, group) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.total = total
        size = dist.get_world_size(group)
        gathered = x.new_empty((size * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(gathered, x.contiguous(), group=group)
        out = x.new_zeros((total + 1,) + tuple(x.shape[1:]))  # the last row collects the padding
        out.index_copy_(0, all_ids.clamp(max=total), gathered)
        return out[:total]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        return _select_rows(grad, ids), None, None, None, None


class DispatchedTokens:
    """One forward's token placement under MagiAttention's dispatch, for `N` samples of `S` tokens.

    `ids_cp` are the tokens of this cp rank (what attention sees); with sequence parallel the residual stream
    of tp rank t holds the t-th of tp equal parts of them (`ids`)."""

    def __init__(self, cp: MagiContextParallel, ranges: AttnRanges, N: int, S: int, tp_rank: int = 0, tp_split: int = 1):
        self.cp, self.N, self.S, self.total = cp, N, S, N * S
        self.key = cp.key(ranges, self.total)
        self.ids_cp = cp.position_ids(self.key).to(torch.long).reshape(-1)
        local = self.ids_cp.numel()
        if local % tp_split:
            raise ValueError(f"MagiAttention gave this context-parallel rank {local} tokens, which do not split into "
                             f"parallel.tp ({tp_split}) equal parts for parallel.sequence_parallel; turn sequence "
                             f"parallel off or choose a token count per sample that cp x tp divides")
        part = local // tp_split
        self.ids = self.ids_cp[tp_rank * part: (tp_rank + 1) * part]
        group = cp.cp_group
        gathered = self.ids_cp.new_empty(dist.get_world_size(group) * local)
        dist.all_gather_into_tensor(gathered, self.ids_cp.contiguous(), group=group)
        self.all_ids = gathered  # every rank holds the same number of (padded) tokens
        self.valid_cp = self.ids_cp < self.total

    # ------------------------------------------------------------------ token moves
    def split(self, h: torch.Tensor) -> torch.Tensor:
        """(S, N, C) sequence-first, all tokens -> (L, 1, C) this rank's residual-stream tokens."""
        flat = h.transpose(0, 1).reshape(self.total, -1)
        return _Scatter.apply(flat, self.ids.to(h.device))[:, None]

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """(L_cp, 1, C) this cp rank's tokens -> (S, N, C) sequence-first, all tokens, on every rank."""
        device = out.device
        full = _Gather.apply(out[:, 0], self.ids_cp.to(device), self.all_ids.to(device), self.total, self.cp.cp_group)
        return full.reshape(self.N, self.S, -1).transpose(0, 1)

    # ------------------------------------------------------------------ per-token lookups
    def rope(self, table: torch.Tensor) -> torch.Tensor:
        """Rows of a per-position (S, R) table for the cp rank's tokens (padding reads row 0)."""
        pos = torch.where(self.valid_cp, self.ids_cp % self.S, 0)
        return table.index_select(0, pos.to(table.device))

    def rows(self, rows: torch.Tensor, stream: bool) -> torch.Tensor:
        """Per-token caption rows (N, S) (global, -1 = none) of this rank's tokens: the residual-stream part
        (stream=True) or all of the cp rank's tokens; padding gets -1."""
        return _select_rows(rows.reshape(-1), self.ids if stream else self.ids_cp, fill=-1)

    # ------------------------------------------------------------------ attention
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Exact global block-causal attention for this rank's (L_cp, h, d) queries."""
        return self.cp.calc_attn(q, k, v, self.key)
