"""Bucketed data-parallel gradient reduction, launched while backward is still running (ZeRO-2).

The parameters are cut into buckets in the order backward produces their gradients (the reverse of their
registration order, as in megatron-core's DDP), and each bucket belongs to one owner rank of the data x
context parallel group (parallel/zero.py updates each parameter on its owner). A post-accumulate-grad hook
moves every gradient into its bucket's flat buffer (fp32 by default, whatever the parameter's dtype: the
micro-batch sum and the reduction then lose nothing to bf16) and frees the parameter's `.grad`. When the last
gradient of a bucket has arrived for the last micro-batch of the step, the bucket is reduced to its owner
asynchronously, so the reduction of the late layers runs while backward computes the early ones. Buckets are
always launched in index order (a bucket ready early waits for its predecessors), so every rank issues the
same collectives in the same order whatever order its hooks fire in.

Reducing each bucket to its owner (`dist.reduce`) is the reduce-scatter of ZeRO with parameter-granular
shards: the owner receives the sum, the others drop their buffer once it is sent. Together with the owners'
broadcast of the updated parameters (the all-gather) every rank moves 2 (W-1)/W of the gradient bytes on
average, the analytic minimum of a data-parallel step; an all-reduce of the gradients followed by the
broadcast moves 3 (W-1)/W.

Gradients a rank never produced (a parameter unused by its micro-batches) count as zeros: `finish` launches
whatever is left, in order, and waits for everything.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

# megatron-core's default bucket size (elements); small models get smaller buckets (see bucket_numel).
DEFAULT_BUCKET_NUMEL = 40_000_000
# At least this many buckets per rank of the group, so that the owners are balanced and reduction starts
# early even when the whole model would fit one default bucket.
MIN_BUCKETS_PER_RANK = 4


def bucket_numel(total: int, world: int, cap: int = DEFAULT_BUCKET_NUMEL) -> int:
    return max(1, min(cap, math.ceil(total / (MIN_BUCKETS_PER_RANK * world))))


@dataclass
class Bucket:
    index: int
    names: List[str]
    numels: List[int]
    owner: int = 0  # rank in the data x context parallel group
    offsets: List[int] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(self.numels)


def plan_buckets(named: Sequence[Tuple[str, object]], world: int, cap: int = DEFAULT_BUCKET_NUMEL) -> List[Bucket]:
    """Buckets over `named` (objects with `.numel()`), in backward order, each given to an owner rank:
    greedy over bucket sizes, largest first, ties by bucket index (every rank computes the same plan, and so
    does every tensor-parallel peer: their local shapes are equal)."""
    order = list(reversed(named))
    limit = bucket_numel(sum(p.numel() for _, p in order), world, cap)
    buckets: List[Bucket] = []
    current = Bucket(0, [], [])
    for name, p in order:
        if current.names and current.numel + p.numel() > limit:
            buckets.append(current)
            current = Bucket(len(buckets), [], [])
        current.names.append(name)
        current.numels.append(p.numel())
    if current.names:
        buckets.append(current)
    loads = [0] * world
    for b in sorted(buckets, key=lambda b: (-b.numel, b.index)):
        b.owner = min(range(world), key=lambda r: (loads[r], r))
        loads[b.owner] += b.numel
    for b in buckets:
        b.offsets = [sum(b.numels[:i]) for i in range(len(b.numels))]
    return buckets


class GradBuckets:
    """The hooks and flat buffers of one optimizer's buckets (see the module docstring).

    Per step: `begin(backwards)` (how many backward passes reach each parameter: the micro-batches), the
    backward passes, then `finish()` -> {name: summed gradient} for the parameters this rank owns."""

    def __init__(self, buckets: List[Bucket], params: Dict[str, torch.nn.Parameter], group, dtype: torch.dtype,
                 overlap: bool = True):
        self.buckets = buckets
        self.params = params
        self.group = group
        self.world = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        self.dtype = dtype
        self.overlap = overlap
        self.slot = {id(params[n]): (b, i) for b in buckets for i, n in enumerate(b.names)}
        self.handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params.values()]
        # (bucket index, launched, done) in perf_counter seconds, when `record` is on (tools/bench_dp_sync.py).
        self.record = False
        self.timeline: List[Tuple[int, float, float]] = []
        self.bytes_sent = 0  # payload handed to collectives by this rank since construction
        self.begin(1)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def begin(self, backwards: int) -> None:
        if backwards < 1:
            raise ValueError(f"a step needs at least one backward pass per parameter, got {backwards}")
        self.expected = backwards
        self.seen = {id(p): 0 for p in self.params.values()}
        self.pending = [len(b.names) * backwards for b in self.buckets]
        self.buffers: List[Optional[torch.Tensor]] = [None] * len(self.buckets)
        self.works: List[Optional[Tuple[object, float]]] = [None] * len(self.buckets)
        self.next_launch = 0

    def _buffer(self, b: Bucket, device: torch.device) -> torch.Tensor:
        if self.buffers[b.index] is None:
            # Zeros: a parameter that gets no gradient on this rank contributes nothing to the sum.
            self.buffers[b.index] = torch.zeros(b.numel, dtype=self.dtype, device=device)
        return self.buffers[b.index]

    @torch.no_grad()
    def _on_grad(self, p: torch.nn.Parameter) -> None:
        b, i = self.slot[id(p)]
        if self.works[b.index] is not None or self.seen[id(p)] >= self.expected:
            raise RuntimeError(f"parameter {b.names[i]!r} got a gradient after its bucket was reduced: more backward "
                               f"passes than the {self.expected} micro-batches announced to begin()")
        view = self._buffer(b, p.device)[b.offsets[i]: b.offsets[i] + b.numels[i]].view_as(p)
        # The first micro-batch's gradient is copied, later ones added: the arithmetic of autograd's own
        # accumulation into .grad, so fp32 runs are bit-identical to accumulating there.
        view.copy_(p.grad) if self.seen[id(p)] == 0 else view.add_(p.grad)
        p.grad = None
        self.seen[id(p)] += 1
        self.pending[b.index] -= 1
        if self.overlap and self.pending[b.index] == 0:
            self._launch_ready(p.device)

    def _launch_ready(self, device: torch.device, everything: bool = False) -> None:
        while self.next_launch < len(self.buckets) and (everything or self.pending[self.next_launch] == 0):
            b = self.buckets[self.next_launch]
            buf = self._buffer(b, device)
            work = None
            launched = time.perf_counter()
            if self.world > 1:
                work = dist.reduce(buf, group=self.group, group_dst=b.owner, async_op=True)
                self.bytes_sent += buf.numel() * buf.element_size()
                if self.record:
                    # Completion as the process group sees it (its worker thread), not when finish() looks.
                    work.get_future().add_done_callback(
                        lambda _, i=b.index, t=launched: self.timeline.append((i, t, time.perf_counter())))
            self.works[b.index] = (work, launched)
            if work is not None and b.owner != self.rank:
                # ZeRO-2: a non-owner needs its copy only until it is sent; the process group's work keeps the
                # tensor alive (and, under NCCL, safe for the allocator) until then.
                self.buffers[b.index] = None
            self.next_launch += 1

    def finish(self, device: torch.device) -> Dict[str, torch.Tensor]:
        """Wait for every bucket (launching those not yet launched) and return this rank's owned sums."""
        self._launch_ready(device, everything=True)
        owned: Dict[str, torch.Tensor] = {}
        for b in self.buckets:
            work, _ = self.works[b.index]
            if work is not None:
                work.wait()
            buf = self.buffers[b.index]
            if b.owner == self.rank:  # (one process: every bucket is its own)
                for name, offset, n in zip(b.names, b.offsets, b.numels):
                    owned[name] = buf[offset: offset + n].view(self.params[name].shape)
            self.buffers[b.index] = None  # non-owners free their copy; owners keep it through `owned`
        return owned
