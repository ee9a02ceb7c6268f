"""Completing gradients after backward, before the optimizer (exact: sums, no approximations).

Every rank ends backward with gradients that may be partial (see parallel/sequence.py):
- over the data x context parallel ranks: always (different samples / different tokens);
- over the tensor-parallel ranks: for TP-replicated parameters that only saw this rank's heads or, with
  sequence parallel, this rank's tokens (`plan.tp_partial_grad`);
- over the ranks that share a replicated KV head (tp > num_query_groups).
Tensor-parallel shards of sharded weights are complete per rank.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from magi_train.model.dit import VideoDiT
from magi_train.parallel.plan import plan_of, shard_spec, tp_partial_grad


def _coalesced_all_reduce(grads: List[torch.Tensor], group) -> None:
    # One flat buffer per call: one collective instead of one per parameter.
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def _kv_replica_reduce(model: VideoDiT, grads: List[torch.Tensor]) -> None:
    """Sum the gradient of each replicated KV head over the tp / kv ranks that hold it."""
    plan = plan_of(model)
    tp, group = plan.tp, plan.tp_group
    replicas = tp // model.cfg.num_query_groups
    me = group.rank()
    for grad in grads:
        gathered = [torch.empty_like(grad) for _ in range(tp)]
        dist.all_gather(gathered, grad.contiguous(), group=group)
        first = me - me % replicas
        grad.copy_(torch.stack(gathered[first: first + replicas]).sum(0))


def _model_grads(model: VideoDiT, grads: Optional[Dict[str, torch.Tensor]]) -> List[Tuple[str, torch.Tensor]]:
    if grads is None:
        return [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    return [(n, grads[n]) for n, _ in model.named_parameters() if n in grads]


def finalize_model_grads(models: Iterable[VideoDiT], dp_cp_group=None,
                         grads: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Make every local gradient the gradient of the global loss w.r.t. this rank's parameters.

    `grads`: the data-parallel sums this rank owns ({name: gradient}, parallel/zero.py reduce_grads), which
    only need the tensor-parallel sums; None: every parameter's `.grad`, summed over `dp_cp_group` too. The
    owned sets of tensor-parallel peers are the same parameters (equal local shapes give equal buckets), so
    their collectives pair up."""
    for model in models:
        plan = plan_of(model)
        named = _model_grads(model, grads)
        if plan.tp > 1:
            _coalesced_all_reduce([g for n, g in named if tp_partial_grad(model, n)], plan.tp_group)
            if plan.tp > model.cfg.num_query_groups:
                kv = [g for n, g in named if n.endswith(("linear_qkv.k.weight", "linear_qkv.v.weight", "linear_kv_xattn.weight"))]
                _kv_replica_reduce(model, kv)
        if grads is None and dp_cp_group is not None and dist.get_world_size(dp_cp_group) > 1:
            _coalesced_all_reduce([g for _, g in named], dp_cp_group)


def global_grad_norm(models: Sequence[VideoDiT], full_shapes: Dict[str, Tuple[int, ...]], parallel,
                     grads: Optional[Dict[str, torch.Tensor]] = None, as_tensor: bool = False):
    """Global gradient norm: every parameter element counted once, whatever the layout (collective over
    tp and pp, and over dp x cp when `grads` are this rank's owned shards; without `grads` every `.grad` is
    already complete over dp x cp). One host sync for the whole model."""
    terms = []
    for model in models:
        for name, grad in _model_grads(model, grads):
            # Tensor-parallel replicas (replicated params, replicated KV heads) are counted on one rank.
            if shard_spec(model, name, full_shapes[name]).writer:
                terms.append(grad.detach().double().square().sum())
    # On the gradients' device, so that the reduction suits the group's backend (gloo: CPU, nccl: CUDA).
    device = parallel.device  # (a rank may own no gradient; the reduction still needs its backend's device)
    # Summed in parameter order (the running sum it always was).
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for term in terms:
        sq = sq + term
    reduce_over = [(parallel.groups.tp, parallel.tp), (parallel.groups.pp, parallel.pp)]
    if grads is not None:
        reduce_over.append((parallel.groups.dp_cp, parallel.dp * parallel.cp))
    for group, size in reduce_over:
        if size > 1:
            dist.all_reduce(sq, group=group)
    # as_tensor: a 0-d float64 tensor on the gradients' device, read by the caller with whatever else it needs.
    return sq.sqrt() if as_tensor else float(sq.sqrt())
