"""What `parallelize_dit` did to a model, recorded on it: the one place the gradient, checkpoint and load code
read a layout from (instead of asking the model, which knows no process group, or rebuilding a meta model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from magi_train.parallel.sharding import ShardSpec, tp_shard_spec

# Parameters whose gradient is partial on each tensor-parallel rank even without sequence parallel: they
# act on every head, and each rank holds only its heads.
_HEAD_SHARED = ("q_layernorm", "k_layernorm", "q_layernorm_xattn", "k_layernorm_xattn", "rope")


@dataclass(frozen=True)
class DiTParallelPlan:
    # The whole model's state dict (every pipeline stage, TP=1): key -> (shape, dtype), recorded from the
    # meta model before it was sharded. This is the released MAGI-1 layout that checkpoints hold.
    full_state: Dict[str, Tuple[Tuple[int, ...], torch.dtype]]
    full_parameters: Tuple[str, ...]  # the whole model's parameter names (buffers excluded)
    tp_group: Optional[torch.distributed.ProcessGroup] = None
    tp: int = 1
    tp_rank: int = 0
    sequence_parallel: bool = False  # effective: requested and tp > 1
    cp_impl: str = "ulysses"

    @property
    def full_shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {k: shape for k, (shape, _) in self.full_state.items()}


def record_full_state(model: nn.Module) -> Tuple[Dict[str, Tuple[Tuple[int, ...], torch.dtype]], Tuple[str, ...]]:
    """(key -> (shape, dtype), parameter names) of a model that has not been sharded yet."""
    state = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    return state, tuple(name for name, _ in model.named_parameters())


def plan_of(model: nn.Module) -> DiTParallelPlan:
    """The model's parallel plan; a model `parallelize_dit` never touched is a whole single-process model."""
    plan = getattr(model, "parallel_plan", None)
    if plan is None:
        plan = DiTParallelPlan(*record_full_state(model))
    return plan


def shard_spec(model: nn.Module, name: str, full_shape) -> ShardSpec:
    """How this rank's `name` is cut from the full (TP=1) tensor of `full_shape`."""
    plan = plan_of(model)
    return tp_shard_spec(name, full_shape, model.cfg, plan.tp_rank, plan.tp)


def tp_partial_grad(model: nn.Module, name: str) -> bool:
    """Whether this TP-replicated parameter's gradient is a partial sum per TP rank (to be all-reduced)."""
    plan = plan_of(model)
    if plan.tp == 1 or tp_shard_spec(name, (1, 1), model.cfg, 0, plan.tp).dim is not None:
        return False
    return plan.sequence_parallel or any(part in _HEAD_SHARED for part in name.split("."))
