"""ZeRO-1 data parallelism: AdamW state sharded over the data x context parallel ranks.

Why this and not FSDP2 or megatron's DistributedOptimizer: it is the same ~100 lines of plain
torch.distributed on gloo (CPU tests) and NCCL (GPUs), with no CUDA-only code paths to patch (megatron's
optimizer hard-codes CUDA devices) and no DTensor parameters (FSDP2) that would have to be reconciled with
megatron's tensor-parallel layers and with the pipeline schedule. Parameters and gradients stay replicated
over the data-parallel ranks (the DiT is already split by TP x PP); only the optimizer state, the biggest
part (2 fp32 moments per parameter), is split.

Each rank of the group owns whole parameters, assigned greedily by size in a fixed order, so every rank
(and every tensor-parallel peer, whose local shapes are the same) computes the same assignment. After the
gradients are summed (`finalize_model_grads`), each rank updates the parameters it owns and broadcasts them.
Exactness: every rank applies the same clipped gradient and the same AdamW arithmetic as one process.
"""

from __future__ import annotations

import heapq
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from magi_train.config.schema import OptimizerConfig
from magi_train.training.optim import no_weight_decay


def assign_owners(named: Sequence[Tuple[str, torch.Tensor]], world: int) -> Dict[str, int]:
    """Greedy balance of parameter sizes over `world` ranks: largest first, ties by name."""
    order = sorted(named, key=lambda kv: (-kv[1].numel(), kv[0]))
    loads = [(0, r) for r in range(world)]
    heapq.heapify(loads)
    owner = {}
    for name, p in order:
        load, rank = heapq.heappop(loads)
        owner[name] = rank
        heapq.heappush(loads, (load + p.numel(), rank))
    return owner


class ShardedAdamW:
    """AdamW over named parameters, each updated by its owner rank in `group` (None: one process)."""

    def __init__(self, named: Sequence[Tuple[str, nn.Parameter]], cfg: OptimizerConfig, group: Optional[dist.ProcessGroup] = None):
        self.group = group if group is not None and dist.get_world_size(group) > 1 else None
        world = 1 if self.group is None else dist.get_world_size(self.group)
        me = 0 if self.group is None else dist.get_rank(self.group)
        self.params = {n: p for n, p in named if p.requires_grad}
        self.owner = assign_owners(list(self.params.items()), world)
        self.rank = me
        owned = [(n, p) for n, p in self.params.items() if self.owner[n] == me]
        self.names = {id(p): n for n, p in owned}
        decay = [p for n, p in owned if not no_weight_decay(n, p)]
        keep = [p for n, p in owned if no_weight_decay(n, p)]
        self.inner = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
            foreach=False,  # one kernel per tensor: identical results whatever the grouping (exact resume)
        )
        # Broadcast order: per owner, its parameters in a fixed order (one flat buffer per owner).
        self.by_owner: List[List[nn.Parameter]] = [[p for n, p in self.params.items() if self.owner[n] == r] for r in range(world)]

    @property
    def param_groups(self):
        return self.inner.param_groups

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.inner.step()
        if self.group is None:
            return
        for rank, params in enumerate(self.by_owner):
            if not params:
                continue
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            dist.broadcast(flat, group=self.group, group_src=rank)
            offset = 0
            for p in params:
                p.copy_(flat[offset: offset + p.numel()].view_as(p))
                offset += p.numel()

    # ------------------------------------------------------------------ checkpoint view
    def owned_state(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """{parameter name: {"exp_avg", "exp_avg_sq", "step"}} for the parameters this rank owns and has
        stepped; the tensors have the parameter's local (tensor-parallel) shape."""
        out = {}
        for group in self.inner.param_groups:
            for p in group["params"]:
                state = self.inner.state.get(p)
                if state:
                    out[self.names[id(p)]] = {
                        "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"],
                        "step": torch.as_tensor(state["step"], dtype=torch.float32).reshape(1),
                    }
        return out

    def load_owned_state(self, state: Dict[str, Dict[str, torch.Tensor]]) -> None:
        for group in self.inner.param_groups:
            for p in group["params"]:
                name = self.names[id(p)]
                if name not in state:
                    continue
                s = state[name]
                # A separate step tensor per parameter (a shared one would be incremented once per parameter).
                self.inner.state[p] = {
                    "step": torch.tensor(float(s["step"].reshape(-1)[0])),
                    "exp_avg": s["exp_avg"].detach().clone().to(p.dtype).reshape(p.shape),
                    "exp_avg_sq": s["exp_avg_sq"].detach().clone().to(p.dtype).reshape(p.shape),
                }
