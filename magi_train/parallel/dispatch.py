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

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from magi_train.model.attention import AttnRanges, softmax_scale
from magi_train.model.magi_attention import to_magi_ranges
from magi_train.parallel.sequence import gather_tokens


class MagiContextParallel:
    """Context parallelism with MagiAttention's distributed API, over one NCCL context-parallel group.

    The packed sequence (all samples, flat and batch-major: the token coordinates of `AttnRanges`) is cut into
    dispatch chunks that MagiAttention spreads over the cp ranks so that each rank gets the same number of
    tokens and about the same attention area (later chunks of a block-causal sample see more keys):

        cp = MagiContextParallel(cp_group, num_heads_q=Hq, num_heads_kv=Hkv, head_dim=D)
        key = cp.key(block_causal_ranges(N, chunks, tokens_per_chunk), total_seqlen=N * chunks * tokens_per_chunk)
        local_x = cp.dispatch(x, key)                  # (T, ...) -> this rank's padded, permuted (T_local, ...)
        local_q, local_k, local_v = ...                # any token-wise op runs on local_x unchanged
        local_out = cp.calc_attn(local_q, local_k, local_v, key)
        out = cp.undispatch(local_out, key)            # (T_local, ...) -> (T, ...) in global order

    Dispatch permutes tokens: per-token inputs such as RoPE tables or timestep maps must be dispatched with
    the same key. Every rank of the group makes the same calls with the same ranges. The DiT itself uses only
    `key`, `position_ids` and `calc_attn` (parallel/dispatch.py moves its tokens with its own autograd ops).

    Written against MagiAttention v1.1.1 (`magi_attn_flex_key` with `pad_size` deprecated and `chunk_size`
    given through `DispatchConfig`; v1.0.x/v1.1.0 took them as required arguments). It needs several Hopper
    GPUs; on CPU the tests run the DiT's use of it against an emulation of this API
    (tests/distributed/fake_magi_api.py).
    """

    def __init__(self, cp_group, num_heads_q: int, num_heads_kv: int, head_dim: int, chunk_size: Optional[int] = None):
        self.cp_group = cp_group
        self.num_heads_q = num_heads_q
        self.num_heads_kv = num_heads_kv
        self.head_dim = head_dim
        # None: MagiAttention derives it from the sequence length and the cp size.
        self.chunk_size = chunk_size

    def key(self, ranges: AttnRanges, total_seqlen: int):
        """The runtime key of one attention pattern (self-attention: queries and keys are the same tokens)."""
        from magi_attention.api import AttnRanges as MagiRanges
        from magi_attention.api import DispatchConfig, DistAttnConfig, magi_attn_flex_key

        q_ranges, k_ranges, _, _, _ = to_magi_ranges(ranges)
        return magi_attn_flex_key(
            q_ranges=MagiRanges.from_ranges(q_ranges.tolist()),
            k_ranges=MagiRanges.from_ranges(k_ranges.tolist()),
            attn_mask_type="full",  # broadcast to every slice
            total_seqlen_q=total_seqlen,
            total_seqlen_k=total_seqlen,
            num_heads_q=self.num_heads_q,
            num_heads_kv=self.num_heads_kv,
            head_dim=self.head_dim,
            pad_size=0,  # deprecated: the padding is computed from the chunk size
            cp_group_or_mesh=self.cp_group,
            dist_attn_config=DistAttnConfig(dispatch_config=DispatchConfig(chunk_size=self.chunk_size)),
            is_same_source=True,
            is_q_permutable=True,
            is_k_permutable=True,
        )

    def position_ids(self, key) -> torch.Tensor:
        """Global token ids (batch-major flat coordinates) of this rank's dispatched tokens, in local order;
        ids >= total_seqlen are the padding MagiAttention appends to make the split even."""
        from magi_attention.api import get_position_ids

        return get_position_ids(key)

    def dispatch(self, x: torch.Tensor, key) -> torch.Tensor:
        from magi_attention.api import dispatch

        return dispatch(x, key)

    def calc_attn(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key) -> torch.Tensor:
        """Local (T_local, H, D) q/k/v of dispatched tokens -> local output in q's dtype."""
        from magi_attention.api import calc_attn

        out, _meta = calc_attn(q, k, v, key, softmax_scale=softmax_scale(q.shape[-1]))
        return out.to(q.dtype)

    def undispatch(self, y: torch.Tensor, key) -> torch.Tensor:
        from magi_attention.api import undispatch

        return undispatch(y, key)


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
    """One forward's token placement under MagiAttention's dispatch, for `N` samples of `S` tokens (the
    model's `TokenPlacement`, magi_train/model/layout.py).

    `ids_cp` are the tokens of this cp rank (what attention sees); with sequence parallel the residual stream
    of tp rank t holds the t-th of tp equal parts of them (`ids`). Self-attention's core kernel is
    `MagiCoreAttention`, which takes this object as its ranges."""

    supports_kv_cache = False  # MagiAttention's dispatch has no KV cache

    def __init__(self, cp: MagiContextParallel, ranges: AttnRanges, N: int, S: int, tp_rank: int = 0, tp_split: int = 1,
                 sp_group: Optional[dist.ProcessGroup] = None):
        self.cp, self.N, self.S, self.total = cp, N, S, N * S
        self.tokens = S
        self.attn_ranges = self
        self.sp_group = sp_group  # the TP group under sequence parallel
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
        """(L, 1, C) this rank's tokens -> (S, N, C) sequence-first, all tokens, on every rank."""
        if self.sp_group is not None:
            out = gather_tokens(out, self.sp_group)  # (L_cp, 1, C): the cp rank's tokens
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

    # ------------------------------------------------------------------ the rest of the placement contract
    def stream_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.rows(rows, stream=True)[:, None]  # (L, 1)

    def query_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.rows(rows, stream=False)

    def to_heads(self, q, k, v):
        return q, k, v  # heads are not split: calc_attn fetches the remote keys itself

    def from_heads(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def stream_shape(self):
        return (self.ids.numel(), 1), self.ids_cp.numel()


class MagiDispatchLayout:
    """The token layout of `parallel.cp_impl=magi`: every forward's tokens follow MagiAttention's dispatch
    of its ranges (`DispatchedTokens`); `sp_group` (the TP group under sequence parallel) splits them further."""

    def __init__(self, cp: MagiContextParallel, sp_group: Optional[dist.ProcessGroup] = None):
        self.magi_cp = cp
        self.sp_group = sp_group
        self.split = 1 if sp_group is None else sp_group.size()
        self.tp_rank = 0 if sp_group is None else sp_group.rank()

    def place(self, ranges: Optional[AttnRanges], N: int, S: int) -> DispatchedTokens:
        if ranges is None:
            raise ValueError("parallel.cp_impl=magi: pass the micro-batch's VideoDiT.place(...) as its self-attention "
                             "(the token split follows MagiAttention's dispatch)")
        return DispatchedTokens(self.magi_cp, ranges, N, S, self.tp_rank, self.split, self.sp_group)


class MagiCoreAttention(nn.Module):
    """The self-attention kernel slot under MagiAttention's context parallel: its distributed attention over
    the cp group (`ranges` is the forward's `DispatchedTokens`)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ranges: DispatchedTokens) -> torch.Tensor:
        return ranges.attend(q, k, v)
