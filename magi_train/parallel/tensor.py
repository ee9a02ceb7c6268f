"""Sequence-parallel collectives over the tensor-parallel group (dim 0 = tokens), written with plain
torch.distributed calls so the same code runs on gloo (CPU) and NCCL."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((dist.get_world_size(group) * x.shape[0],) + tuple(x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // dist.get_world_size(group),) + tuple(x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group), None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group), None


def sp_gather(x: torch.Tensor, group) -> torch.Tensor:
    """(S/tp, ...) -> (S, ...) before a column-parallel linear; the backward sums the ranks' input grads."""
    return _Gather.apply(x, group)


def sp_reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    """Partial sums (S, ...) of a row-parallel linear -> this rank's tokens (S/tp, ...), summed."""
    return _ReduceScatter.apply(x, group)
