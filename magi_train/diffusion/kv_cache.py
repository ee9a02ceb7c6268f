"""The per-layer key/value cache of chunk-wise generation, bounded by the attention window.

Attention never reads further back than the largest kv range, so a buffer per layer holds only a sliding window
of chunks: `capacity` chunks starting at absolute chunk `base` (slot = chunk - base), each chunk `[K_rope | V]`
for its `chunk_tokens` tokens. `cache_window` derives the capacity, and for every DiT call the earliest chunk
that call or any later one still reads (`keep`), from the staircase plans; both depend on the window and the kv
ranges, not on the video's length. When a call would run past the end of the buffer, the window slides: `base`
moves to `keep` and the chunks still to be read (at most the lookback) move to the front, once per layer.

A call reads the chunks `[lo, first)` (its kv ranges' reach) and holds chunks `[first, first + current)`:
* on the compute device the current keys/values are written into their own slots and attention reads the
  buffer slice `[lo, first + current)` in place: nothing is concatenated or copied but the current tokens;
* with `offload=True` (host buffers) the window `[lo, first)` is copied to the device and concatenated with the
  current tokens, and only the writing pass's chunks that a later call reads are stored back.
Key coordinates handed to attention therefore start at chunk `lo` (the sampler shifts its kv ranges by `lo`).

Noisy chunks are written too (as released); a slot is only read after the clean re-forward of its chunk (the
last write of the writing pass) has overwritten it, so which pass last wrote a slot before that is irrelevant.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from magi_train.diffusion.schedule import StepPlan


def call_reach(plan: StepPlan) -> Tuple[int, int]:
    """(lo, first): the chunks [lo, first) a call of `plan` reads from the cache (lo == first: none)."""
    first = plan.slice_point
    return min([first] + [s for s, _ in plan.kv_chunks]), first


def uses_cache(plan: StepPlan) -> bool:
    """Whether the plan's model calls go through the cache (released: a clean re-forward or earlier chunks)."""
    return plan.clean_chunk is not None or plan.slice_point > 0


@dataclass(frozen=True)
class CacheWindow:
    capacity: int  # chunks each layer's buffer holds (at most the video's)
    keep: Tuple[int, ...]  # per plan: the earliest chunk this call or a later one reads
    prefix_keep: int  # the same for the prefix extraction (before plan 0): the prefix chunks worth storing
    max_read: int  # chunks the widest read reaches back (the tokens a call reads, in chunks)


def cache_window(plans: Sequence[StepPlan], prefix_chunks: int = 0, duplicate: bool = False) -> CacheWindow:
    """The window of a generation following `plans`. `duplicate`: a call may append one more chunk after its
    last (distilled models' nearly-clean duplicate, which is written into the next chunk's slot)."""
    keep: List[int] = [0] * len(plans)
    running = None
    for i in range(len(plans) - 1, -1, -1):
        if uses_cache(plans[i]):
            lo = call_reach(plans[i])[0]
            running = lo if running is None else min(running, lo)
        # No later call reads: nothing needs keeping, the window may start at this call's first chunk.
        keep[i] = running if running is not None else plans[i].slice_point
    prefix_keep = min(keep[0], prefix_chunks) if plans else prefix_chunks
    capacity, max_read = max(1, prefix_chunks - prefix_keep), 0
    for plan, k in zip(plans, keep):
        if uses_cache(plan):
            lo, first = call_reach(plan)
            capacity = max(capacity, first + len(plan.forwarded) + int(duplicate) - min(k, lo))
            max_read = max(max_read, first - lo)
    # Never more than the video: a call that would need the duplicate's slot past it concatenates instead.
    video = max([prefix_chunks] + [p.range_num for p in plans])
    return CacheWindow(max(1, min(capacity, video)), tuple(keep), prefix_keep, max_read)


class KVCache:
    def __init__(self, num_layers: int, chunk_tokens: int, capacity: int, offload: bool = False):
        if num_layers < 1 or chunk_tokens < 1 or capacity < 1:
            raise ValueError(f"KVCache needs num_layers, chunk_tokens and capacity >= 1, got {num_layers}, "
                             f"{chunk_tokens}, {capacity}")
        self.num_layers = num_layers
        self.chunk_tokens = chunk_tokens
        self.capacity = capacity  # chunks
        self.offload = offload
        # Allocated on the first write, when head count, head dim, dtype and device are known.
        self._buffers: List[Optional[torch.Tensor]] = [None] * num_layers
        self.base = 0  # absolute chunk in slot 0
        self._layer_base = [0] * num_layers  # where each layer's buffer is (it slides on the layer's next call)
        self._move_end = 0  # chunks [base, _move_end) move to the front when a layer slides
        self.filled = 0  # chunks [0, filled) have been written by a writing pass at least once
        # What calls read and copy, per layer (counted, for tests and benchmarks): tokens read -> calls.
        self.read_tokens: Counter = Counter()
        self.copied_tokens = 0  # tokens copied besides the current ones (offload reads, slides)

    def _buffer(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers[layer]
        if buf is None:
            _, heads, dim = like.shape
            pin = self.offload and like.is_cuda
            device = torch.device("cpu") if self.offload else like.device
            buf = torch.zeros(self.capacity * self.chunk_tokens, heads, 2 * dim, dtype=like.dtype, device=device,
                              pin_memory=pin)
            self._buffers[layer] = buf
            self._layer_base[layer] = self.base
        return buf

    def _slide(self, layer: int, buf: torch.Tensor) -> None:
        """Move this layer's chunks [base, _move_end) to the front (they were at their old slots)."""
        old, new, t = self._layer_base[layer], self.base, self.chunk_tokens
        if self._move_end - old > self.capacity:
            raise RuntimeError(f"KV cache layer {layer} missed a slide of its window (at chunk {old}, now {new})")
        src, n = (new - old) * t, max(0, self._move_end - new) * t
        # Ascending pieces no longer than the shift never read what an earlier piece wrote.
        step = max(src, 1)
        for a in range(0, n, step):
            b = min(n, a + step)
            buf[a:b].copy_(buf[src + a:src + b])
        self.copied_tokens += n
        self._layer_base[layer] = new

    def _make_room(self, first: int, end: int, keep: int) -> None:
        """Slide the window so that chunks [keep, end) fit (keeps [keep, first), the ones still to be read)."""
        if end - self.base <= self.capacity:
            return
        if keep < self.base or end - keep > self.capacity:
            raise RuntimeError(f"KV cache window of {self.capacity} chunks (from chunk {self.base}) cannot hold "
                               f"chunks [{keep}, {end})")
        self.base = keep
        self._move_end = first

    def hook(self, first: int, lo: int, current: int, write: int = 0, keep: Optional[int] = None):
        """A DiT `kv_hook` for a call holding chunks [first, first + current) that reads the cached chunks
        [lo, first) (attention's key coordinates start at chunk lo) and is the writing pass for its first `write`
        chunks. `keep` (<= lo): the earliest chunk this or any later call reads (default lo)."""
        keep = lo if keep is None else keep
        if (lo < first and keep > lo) or not lo <= first or not 0 <= write <= current:
            raise ValueError(f"KV cache call needs lo <= first, keep <= lo when it reads, 0 <= write <= current; got "
                             f"keep={keep}, lo={lo}, first={first}, write={write}, current={current}")
        if first > self.filled and lo < first:
            raise RuntimeError(f"KV cache read of chunks [{lo}, {first}), but only {self.filled} were written")
        if lo < self.base and lo < first:
            raise RuntimeError(f"KV cache read of chunk {lo}, but the window starts at chunk {self.base}")
        # In place on the device (the call's chunks in their slots), unless it does not fit in the window: then
        # (the prefix extraction of a long prefix, a duplicate past the video's last chunk) like an offloaded one.
        in_place = not self.offload and first + current - min(keep, first) <= self.capacity
        if in_place:
            keep = min(keep, first)
            store_from, store_end = first, first + current
        else:  # chunks before keep are never read again: not stored
            store_from, store_end = max(first, keep), first + write
        self._make_room(first, max(store_end, first), keep)
        t, base = self.chunk_tokens, self.base
        a, s = (lo - base) * t, (first - base) * t
        expected = current * t
        self.read_tokens[s - a] += 1

        def merge(layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            if k.shape[0] != expected:  # inference runs one sample per call
                raise ValueError(f"KV cache call of {current} chunks x {t} tokens got {k.shape[0]} key tokens")
            buf = self._buffer(layer, k)
            if self._layer_base[layer] != base:
                self._slide(layer, buf)
            dim = k.shape[-1]
            if in_place:
                region = buf[s:s + expected]
                region[..., :dim].copy_(k)
                region[..., dim:].copy_(v)
                full = buf[a:s + expected]
            else:
                cur = torch.cat([k, v], dim=-1)
                cached = buf[a:s].to(k.device, non_blocking=True) if lo < first else cur[:0]
                self.copied_tokens += s - a
                if store_end > store_from:
                    w0, w1 = (store_from - base) * t, (store_end - base) * t
                    buf[w0:w1].copy_(cur[(store_from - first) * t:(store_end - first) * t], non_blocking=True)
                full = torch.cat([cached, cur], dim=0)
            return full[..., :dim], full[..., dim:]

        if write:
            self.filled = max(self.filled, first + write)
        # Eager even inside torch.compile: the slots move from call to call, the compiled graphs around it do not.
        # Without torch._dynamo imported nothing can be compiling, and wrapping would import it (about 3 s of
        # CPU, paid at the first cache write of every process otherwise).
        return torch.compiler.disable(merge) if "torch._dynamo" in sys.modules else merge

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers if b is not None)
