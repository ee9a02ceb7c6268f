"""How each DiT parameter is split over the tensor-parallel ranks, in terms of the full (TP=1) tensor.

The full tensor is the released MAGI-1 layout. A rank's local tensor is a concatenation, along one dim, of
slices of the full tensor (`Piece`s). Most sharded weights are one contiguous slice; two are not:

    linear_fc1 (SwiGLU)     full rows [gate | up]; rank r holds [gate_r | up_r] (2 pieces)
    k, v, linear_kv_xattn   with more ranks than KV heads, each KV head is replicated on tp / kv ranks

The same description serves loading a released checkpoint under TP (full -> local), initialising a TP
model identically to a TP=1 model, and the distributed checkpoints (local -> full coordinates).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from magi_train.config.schema import ModelConfig

_LAYER_RE = re.compile(r"^videodit_blocks\.layers\.\d+\.(.+)$")

# Suffixes inside a layer (weights only: the DiT's TP linears have no bias).
_HEADS = ("self_attention.linear_qkv.q.weight", "self_attention.linear_qkv.qx.weight")
_KV = ("self_attention.linear_qkv.k.weight", "self_attention.linear_qkv.v.weight")
_KV_XATTN = "self_attention.linear_kv_xattn.weight"
_ROW = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_FC1 = "mlp.linear_fc1.weight"


@dataclass(frozen=True)
class Piece:
    """local.narrow(dim, local_start, length) == full.narrow(dim, global_start, length)."""

    local_start: int
    global_start: int
    length: int


@dataclass(frozen=True)
class ShardSpec:
    full_shape: Tuple[int, ...]
    dim: Optional[int] = None  # None: the rank holds the full tensor
    pieces: Tuple[Piece, ...] = ()
    # Whether this rank is the one that writes the slices it holds (replicas stay silent).
    writer: bool = True

    @property
    def local_shape(self) -> Tuple[int, ...]:
        if self.dim is None:
            return self.full_shape
        shape = list(self.full_shape)
        shape[self.dim] = sum(p.length for p in self.pieces)
        return tuple(shape)


def _split(full_shape: Sequence[int], dim: int, rank: int, size: int) -> ShardSpec:
    n = full_shape[dim] // size
    return ShardSpec(tuple(full_shape), dim, (Piece(0, rank * n, n),))


def _kv_heads(full_shape, rows_per_head: int, kv_heads: int, rank: int, tp: int) -> ShardSpec:
    if kv_heads % tp == 0:
        return _split(full_shape, 0, rank, tp)
    # tp > kv_heads: ranks r .. r + tp/kv - 1 share KV head r // (tp / kv); the first of them writes.
    replicas = tp // kv_heads
    head = rank // replicas
    return ShardSpec(tuple(full_shape), 0, (Piece(0, head * rows_per_head, rows_per_head),), writer=rank % replicas == 0)


def tp_shard_spec(name: str, full_shape: Sequence[int], cfg: ModelConfig, rank: int, tp: int) -> ShardSpec:
    """The TP layout of parameter `name` (a key of the released state dict) on tensor-parallel rank `rank`."""
    full_shape = tuple(full_shape)
    m = _LAYER_RE.match(name)
    if tp == 1 or m is None:
        # Everything outside the transformer layers, and the norms/adaLN inside them, is replicated.
        return ShardSpec(full_shape, writer=rank == 0)
    suffix = m.group(1)
    if suffix in _HEADS:
        return _split(full_shape, 0, rank, tp)
    if suffix in _KV:
        return _kv_heads(full_shape, cfg.kv_channels, cfg.num_query_groups, rank, tp)
    if suffix == _KV_XATTN:
        # Rows interleaved per KV head: [K_0 | V_0 | K_1 | V_1 | ...], so a KV head is 2 * d rows.
        return _kv_heads(full_shape, 2 * cfg.kv_channels, cfg.num_query_groups, rank, tp)
    if suffix in _ROW:
        return _split(full_shape, 1, rank, tp)
    if suffix == _FC1:
        if not cfg.gated_linear_unit:
            return _split(full_shape, 0, rank, tp)
        half = full_shape[0] // 2
        n = half // tp
        return ShardSpec(full_shape, 0, (Piece(0, rank * n, n), Piece(n, half + rank * n, n)))
    return ShardSpec(full_shape, writer=rank == 0)


def local_from_full(full: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """This rank's part of a full tensor (a copy when it is assembled from several pieces)."""
    if tuple(full.shape) != spec.full_shape:
        raise ValueError(f"tensor of shape {tuple(full.shape)} does not match the expected full shape {spec.full_shape}")
    if spec.dim is None:
        return full
    parts = [full.narrow(spec.dim, p.global_start, p.length) for p in spec.pieces]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=spec.dim)


def shard_state_dict(full: dict, cfg: ModelConfig, rank: int, tp: int, keys: Optional[Sequence[str]] = None) -> dict:
    """Slice a full (released-layout) state dict for TP rank `rank`; `keys` limits it (a pipeline stage)."""
    names = full.keys() if keys is None else keys
    return {k: local_from_full(full[k], tp_shard_spec(k, full[k].shape, cfg, rank, tp)) for k in names}
