"""An exact CPU emulation of the part of `magi_attention.api` (v1.1.1) that MagiContextParallel calls.

MagiAttention needs Hopper GPUs and NCCL; this stand-in lets gloo tests run the DiT's MagiAttention context
parallel path. What it emulates, with the real API's contracts:

- `magi_attn_flex_key`: the sequence is padded to a multiple of chunk_size x cp and cut into chunks; chunks
  are handed to ranks in a zigzag (0, 1, .., cp-1, cp-1, .., 0, ...), so a rank's tokens are neither
  contiguous nor in one sample, as with the real balanced dispatch.
- `get_position_ids`: the global ids of the rank's tokens in local order (padding ids >= total_seqlen).
- `dispatch` / `undispatch`: pad + select / gather + unpad (forward only; the DiT does not use them).
- `calc_attn`: the exact attention of the rank's queries over the global (q_ranges, k_ranges) pattern, keys
  gathered from all ranks; its backward returns each rank the gradient of its own keys and values, summed
  over every rank's queries (what the real distributed backward computes).

`install()` puts it in sys.modules as `magi_attention.api`; call it in the spawned rank before the model runs.
"""

from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist


@dataclass
class DispatchConfig:
    chunk_size: Optional[int] = None


@dataclass
class DistAttnConfig:
    dispatch_config: DispatchConfig = field(default_factory=DispatchConfig)


class AttnRanges:
    def __init__(self, ranges: List[List[int]]):
        self.ranges = [tuple(r) for r in ranges]

    @staticmethod
    def from_ranges(ranges) -> "AttnRanges":
        return AttnRanges(ranges)


@dataclass
class Key:
    group: object
    total: int
    padded: int
    ids: torch.Tensor  # this rank's global ids, local order
    q_ranges: list
    k_ranges: list


def magi_attn_flex_key(q_ranges, k_ranges, attn_mask_type, total_seqlen_q, total_seqlen_k, num_heads_q, num_heads_kv,
                       head_dim, pad_size, cp_group_or_mesh, dist_attn_config=DistAttnConfig(), is_same_source=True,
                       is_q_permutable=True, is_k_permutable=True) -> Key:
    assert attn_mask_type == "full" and is_same_source and total_seqlen_q == total_seqlen_k and pad_size == 0
    group = cp_group_or_mesh
    cp, rank = group.size(), group.rank()
    total = total_seqlen_q
    chunk = dist_attn_config.dispatch_config.chunk_size or max(1, math.ceil(total / (3 * cp)))
    n_chunks = math.ceil(math.ceil(total / chunk) / cp) * cp
    mine = []
    for j in range(n_chunks):
        r, i = divmod(j, cp)
        if (i if r % 2 == 0 else cp - 1 - i) == rank:
            mine.append(torch.arange(j * chunk, (j + 1) * chunk))
    return Key(group, total, n_chunks * chunk, torch.cat(mine), list(q_ranges.ranges), list(k_ranges.ranges))


def get_position_ids(key: Key) -> torch.Tensor:
    return key.ids.clone()


def dispatch(x: torch.Tensor, key: Key, pad_value: float = 0.0) -> torch.Tensor:
    pad = x.new_full((key.padded - key.total,) + tuple(x.shape[1:]), pad_value)
    return torch.cat([x, pad]).index_select(0, key.ids.to(x.device))


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((group.size() * x.shape[0],) + tuple(x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def undispatch(y: torch.Tensor, key: Key, is_partial_grad: bool = False) -> torch.Tensor:
    out = y.new_zeros((key.padded,) + tuple(y.shape[1:]))
    out[_all_gather(key.ids, key.group)] = _all_gather(y, key.group)
    return out[: key.total]


class _GatherKV(torch.autograd.Function):
    """All-gather of local keys/values; the backward sums every rank's gradient and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        n = grad.shape[0] // ctx.group.size()
        return grad[ctx.group.rank() * n: (ctx.group.rank() + 1) * n], None


def calc_attn(q, k, v, key: Key, sink=None, softmax_scale=None, softcap=0.0, return_max_logits=False):
    all_ids = _all_gather(key.ids, key.group)
    k_all, v_all = _GatherKV.apply(k, key.group), _GatherKV.apply(v, key.group)
    allowed = torch.zeros(key.padded, key.padded, dtype=torch.bool)
    for (q0, q1), (k0, k1) in zip(key.q_ranges, key.k_ranges):
        allowed[q0:q1, k0:k1] = True
    allowed = allowed[key.ids][:, all_ids]  # (local q, gathered k)
    group_size = q.shape[1] // k.shape[1]
    k_all, v_all = (t.repeat_interleave(group_size, dim=1).float() for t in (k_all, v_all))
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("qhd,khd->hqk", q.float(), k_all) * scale
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # queries with no keys give zeros
    out = torch.einsum("hqk,khd->qhd", probs, v_all).to(q.dtype)
    return out, None


def install() -> None:
    api = types.ModuleType("magi_attention.api")
    for name in ("AttnRanges", "DispatchConfig", "DistAttnConfig", "magi_attn_flex_key", "get_position_ids",
                 "dispatch", "undispatch", "calc_attn"):
        setattr(api, name, globals()[name])
    package = types.ModuleType("magi_attention")
    package.api = api
    sys.modules["magi_attention"] = package
    sys.modules["magi_attention.api"] = api
