"""ZeRO-2 data parallelism with fp32 master weights: optimizer state and gradients sharded over the data x
context parallel ranks, parameters replicated in their compute dtype.

Each rank of the group owns whole buckets of parameters (parallel/grad_buckets.py, the same plan on every rank
and on every tensor-parallel peer). Per step:
1. backward: each bucket of gradients is reduced to its owner while backward goes on (`attach_grad_hooks`);
2. `reduce_grads` waits for the buckets: the owner now holds the summed gradient of its parameters (fp32 by
   default), the others hold none;
3. `step`: the owner runs AdamW on the fp32 master copy of each of its parameters (the parameter itself when it
   is fp32), rounds the result into the parameter's dtype and broadcasts its buckets' parameters.
With `model.params_dtype=bfloat16` this is megatron's mixed precision: updates far below bf16's resolution
accumulate in the fp32 master instead of vanishing, and the moments are fp32 whatever the parameters are. The
master of a bf16 parameter is taken from the parameter at the first step (so weights loaded or copied into the
model after the optimizer was built, e.g. a distillation student's teacher, are the start), or from a
checkpoint's `optim.<name>.master`.

Why this and not megatron-core's DistributedDataParallel + DistributedOptimizer or FSDP2: on CPU/gloo
megatron's optimizer needs a global CUDA-to-CPU TorchFunctionMode, and its resharding load path has four
upstream bugs, one silent (a shared Adam `step` tensor; ../shared/reference/megatron-core-on-cpu.md §5); its
checkpoints reshard only through dist_checkpointing, while ours reshard to any tp x cp x pp x dp layout in
safetensors. FSDP2 shards parameters as DTensors, which would have to be reconciled with megatron's
tensor-parallel layers and our pipeline stages. Here it is plain torch.distributed (gloo on CPU, NCCL on GPUs):
the bucketing and overlap of megatron's DDP, whole-parameter shards so that a checkpoint stores each
parameter's state once in full coordinates. Measured by tools/bench_dp_sync.py on gloo (11.2M parameters,
the same buckets): the gradient sync moves 1.78x (2 ranks) / 1.25x (4 ranks) the reduce-scatter minimum of
bytes, and megatron's DDP in its distributed-optimizer mode 2.00x on both (on gloo it all-reduces); both hide
about 85% of it behind backward (torch.profiler). With no measured advantage to megatron's and its costs above,
this module stays.

Exactness: every rank applies the same clipped gradient and the same AdamW arithmetic as one process; the fp32
path is bit-identical to accumulating gradients in `.grad` (the buckets copy, then add, as autograd does).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from magi_train.config.schema import OptimizerConfig
from magi_train.parallel.grad_buckets import DEFAULT_BUCKET_NUMEL, GradBuckets, plan_buckets
from magi_train.training.optim import no_weight_decay


def assign_owners(named: Sequence[Tuple[str, object]], world: int, cap: int = DEFAULT_BUCKET_NUMEL) -> Dict[str, int]:
    """Owner rank of every parameter (objects with `.numel()`): its bucket's (grad_buckets.plan_buckets)."""
    return {name: b.owner for b in plan_buckets(named, world, cap) for name in b.names}


def _fused_adamw(cfg: OptimizerConfig, device: torch.device):
    """(constructor, extra kwargs) of the AdamW to run: torch's per-tensor loop on CPU (identical results
    whatever the grouping: exact resume), apex's FusedAdam or torch's fused kernel on CUDA."""
    if device.type != "cuda":
        return torch.optim.AdamW, {"foreach": False}
    if cfg.fused in ("auto", "apex"):
        try:
            from apex.optimizers import FusedAdam  # NVIDIA apex, built from source (the PyPI "apex" is another package)
        except ImportError as e:
            if cfg.fused == "apex":
                raise RuntimeError(f"optimizer.fused=apex, but NVIDIA apex is not importable here ({e}); use "
                                   f"optimizer.fused=auto or torch") from e
        else:
            return FusedAdam, {"adam_w_mode": True}
    return torch.optim.AdamW, {"fused": True}


class ShardedAdamW:
    """AdamW over named parameters, each updated by its owner rank in `group` (None: one process)."""

    def __init__(self, named: Sequence[Tuple[str, nn.Parameter]], cfg: OptimizerConfig,
                 group: Optional[dist.ProcessGroup] = None, master_weights: bool = True):
        """`master_weights=False` updates bf16 parameters in place, as this optimizer did before it kept fp32
        masters: only for comparisons (tests/unit/test_mixed_precision.py shows such a run stall)."""
        self.group = group if group is not None and dist.get_world_size(group) > 1 else None
        world = 1 if self.group is None else dist.get_world_size(self.group)
        self.rank = 0 if self.group is None else dist.get_rank(self.group)
        self.cfg = cfg
        self.params = {n: p for n, p in named if p.requires_grad}
        self.buckets = plan_buckets(list(self.params.items()), world, cfg.bucket_numel)
        self.owner = {name: b.owner for b in self.buckets for name in b.names}
        owned = [(n, p) for n, p in self.params.items() if self.owner[n] == self.rank]
        # The tensors AdamW updates: fp32 masters of the owned non-fp32 parameters, the fp32 ones themselves.
        self.master: Dict[str, torch.Tensor] = {
            n: torch.empty(p.shape, dtype=torch.float32, device=p.device) for n, p in owned
            if master_weights and p.dtype != torch.float32}
        self._masters_current = not self.master  # filled from the parameters at the first step (or a checkpoint)
        self.updated = {n: self.master.get(n, p) for n, p in owned}
        self.names = {id(t): n for n, t in self.updated.items()}
        decay = [t for n, t in self.updated.items() if not no_weight_decay(n, self.params[n])]
        keep = [t for n, t in self.updated.items() if no_weight_decay(n, self.params[n])]
        device = next(iter(self.params.values())).device if self.params else torch.device("cpu")
        adamw, extra = _fused_adamw(cfg, device)
        # torch's fused kernel keeps the step count on the parameters' device; the per-tensor loop on the CPU.
        self._step_device = device if extra.get("fused") else torch.device("cpu")
        self.inner = adamw(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **extra)
        self.sync: Optional[GradBuckets] = None
        # Broadcast order: per owner, its parameters in a fixed order (one flat buffer per owner).
        self.by_owner: List[List[nn.Parameter]] = [[p for n, p in self.params.items() if self.owner[n] == r]
                                                   for r in range(world)]

    @property
    def param_groups(self):
        return self.inner.param_groups

    # ------------------------------------------------------------------ gradients
    def attach_grad_hooks(self) -> None:
        """Collect the gradients in buckets during backward and reduce each as soon as it is complete. Call
        `zero_grad(backwards=...)` before each step's backward passes and `reduce_grads()` after them."""
        if self.sync is None:
            self.sync = GradBuckets(self.buckets, self.params, self.group, getattr(torch, str(self.cfg.grad_reduce_dtype)),
                                    overlap=self.cfg.overlap_grad_reduce)

    def detach_grad_hooks(self) -> None:
        if self.sync is not None:
            self.sync.close()
            self.sync = None

    def zero_grad(self, backwards: int = 1) -> None:
        """Forget the gradients; `backwards` is how many backward passes (micro-batches) the next step runs."""
        for p in self.params.values():
            p.grad = None
        for t in self.updated.values():
            t.grad = None
        if self.sync is not None:
            self.sync.begin(backwards)

    def reduce_grads(self) -> Dict[str, torch.Tensor]:
        """With the hooks attached: wait for the bucket reductions and hand each owned parameter's summed
        gradient to AdamW (`.grad` of its master, or of itself). Returns {name: gradient} of the owned ones."""
        if self.sync is None:
            raise RuntimeError("reduce_grads() needs attach_grad_hooks() before the backward passes")
        device = next(iter(self.params.values())).device
        for name, grad in self.sync.finish(device).items():
            target = self.updated.get(name)
            if target is not None:
                target.grad = grad if grad.dtype == target.dtype else grad.to(target.dtype)
        return self.grads()

    def grads(self) -> Dict[str, torch.Tensor]:
        """{name: gradient} of the parameters this rank updates (after `reduce_grads`, or set by the caller on
        the parameters' `.grad` without the hooks)."""
        out = {}
        for name, t in self.updated.items():
            g = t.grad if t.grad is not None else self.params[name].grad
            if g is not None:
                out[name] = g
        return out

    @torch.no_grad()
    def scale_grads(self, coef: float) -> None:
        for g in self.grads().values():
            g.mul_(coef)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def _fill_masters(self) -> None:
        if not self._masters_current:
            for name, m in self.master.items():
                m.copy_(self.params[name])
            self._masters_current = True

    @torch.no_grad()
    def step(self) -> None:
        self._fill_masters()
        for name, m in self.master.items():
            p = self.params[name]
            if m.grad is None and p.grad is not None:  # gradients set on the parameters (no hooks)
                m.grad = p.grad.float()
        self.inner.step()
        for name, m in self.master.items():
            self.params[name].copy_(m)
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
        """{parameter name: {"exp_avg", "exp_avg_sq", "step"[, "master"]}} for the parameters this rank owns
        and has stepped; the tensors have the parameter's local (tensor-parallel) shape; "master" (fp32) for
        parameters kept in another dtype."""
        self._fill_masters()
        out = {}
        for group in self.inner.param_groups:
            for t in group["params"]:
                state = self.inner.state.get(t)
                if state:
                    name = self.names[id(t)]
                    step = state["step"] if "step" in state else group["step"]  # apex keeps it per group
                    out[name] = {
                        "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"],
                        "step": torch.as_tensor(step, dtype=torch.float32).reshape(1).cpu(),
                    }
                    if name in self.master:
                        out[name]["master"] = self.master[name]
        return out

    @torch.no_grad()
    def load_owned_state(self, state: Dict[str, Dict[str, torch.Tensor]]) -> None:
        """The inverse of `owned_state` (after the parameters were loaded: a master the state lacks, e.g. from a
        run kept in fp32, is taken from its parameter)."""
        for name, m in self.master.items():
            s = state.get(name, {})
            m.copy_(s["master"].reshape(m.shape) if "master" in s else self.params[name])
        self._masters_current = True
        for group in self.inner.param_groups:
            for t in group["params"]:
                name = self.names[id(t)]
                if name not in state:
                    continue
                s = state[name]
                # A separate step tensor per parameter (a shared one would be incremented once per parameter).
                step = float(s["step"].reshape(-1)[0])
                if "step" in group:  # apex's FusedAdam counts steps per group
                    group["step"] = int(step)
                self.inner.state[t] = {
                    "step": torch.tensor(step, device=self._step_device),
                    "exp_avg": s["exp_avg"].detach().clone().to(t.dtype).reshape(t.shape),
                    "exp_avg_sq": s["exp_avg_sq"].detach().clone().to(t.dtype).reshape(t.shape),
                }
