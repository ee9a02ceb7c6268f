"""The token layout: the one seam through which context and sequence parallelism reach the model.

A `TokenLayout` says where each token of a forward lives. For every forward the model asks it for a
`TokenPlacement` (`layout.place(ranges, N, S)`: N samples of S tokens, or one packed sequence) and then only
calls the placement:

    split(h)            (S, N, C) every token -> this rank's residual stream
    rope(table)         RoPE rows of the tokens this rank's attention queries cover
    stream_rows(rows)   caption row of each residual-stream token, shaped like the stream's (rows, batch)
    query_rows(rows)    caption row of each query token, flat (cross-attention ranges)
    to_heads(q, k, v)   what self-attention's core kernel sees ((N, S_q, h, d), batch-major) ...
    from_heads(out)     ... and back
    attn_ranges         what the self-attention core kernel takes with them
    gather(out)         this rank's output tokens -> (S, N, C) every token, on every rank

The model holds `LocalLayout` (one process: every method is the identity); `parallelize_dit` sets a parallel
one from magi_train/parallel (Ulysses windows with sequence parallel, or MagiAttention's dispatch).
"""

from __future__ import annotations

from typing import Protocol, Tuple

import torch

from magi_train.model.attention import AttnRanges


class TokenPlacement(Protocol):
    tokens: int  # tokens per sample (dense) or of the packed sequence
    attn_ranges: object
    supports_kv_cache: bool

    def split(self, h: torch.Tensor) -> torch.Tensor: ...

    def rope(self, table: torch.Tensor) -> torch.Tensor: ...

    def stream_rows(self, rows: torch.Tensor) -> torch.Tensor: ...

    def query_rows(self, rows: torch.Tensor) -> torch.Tensor: ...

    def to_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor): ...

    def from_heads(self, out: torch.Tensor) -> torch.Tensor: ...

    def gather(self, out: torch.Tensor) -> torch.Tensor: ...

    def stream_shape(self) -> Tuple[Tuple[int, int], int]: ...


class TokenLayout(Protocol):
    def place(self, ranges: AttnRanges, N: int, S: int) -> TokenPlacement: ...


class LocalPlacement:
    """Every token on this process."""

    supports_kv_cache = True

    def __init__(self, ranges: AttnRanges, N: int, S: int):
        self.attn_ranges, self.N, self.tokens = ranges, N, S

    def split(self, h):
        return h

    def rope(self, table):
        return table

    def stream_rows(self, rows):
        return rows.t()  # (S, N)

    def query_rows(self, rows):
        return rows.reshape(-1)  # batch-major, like the attention coordinates

    def to_heads(self, q, k, v):
        return q, k, v

    def from_heads(self, out):
        return out

    def gather(self, out):
        return out

    def stream_shape(self):
        """((rows, batch) of the residual stream, rows of the RoPE tables)."""
        return (self.tokens, self.N), self.tokens


class LocalLayout:
    def place(self, ranges: AttnRanges, N: int, S: int) -> LocalPlacement:
        return LocalPlacement(ranges, N, S)
