"""The staircase ("pipelined") chunk schedule of MAGI-1 inference, as a pure function.

Up to `window` chunks are denoised at once, staggered by one stage (steps / window denoising steps): when the
oldest chunk of the window is clean it leaves, a new chunk enters, and the chunk that just finished is run
once more at t = clean_t so that its clean keys/values enter the KV cache. Each chunk takes exactly `steps`
model evaluations. Chunks fully covered by a prefix video (`prefix_chunks`) are never denoised; their KV is
extracted before the first step.

Each DiT call is described by a `StepPlan`; chunk indices are absolute, key ranges are in chunk units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class StepPlan:
    step: int
    chunks: Tuple[int, ...]  # chunks being denoised, oldest first
    step_index: Tuple[int, ...]  # per denoising chunk: k, its position on the t grid (0 = noise)
    clean_chunk: Optional[int]  # chunk re-forwarded clean before them (just finished), or None
    kv_chunks: Tuple[Tuple[int, int], ...]  # [start, end) keys per forwarded chunk (clean one first)
    emit: Optional[int]  # chunk that is fully denoised after this step
    extract_prefix: bool  # run the prefix chunks once (clean, self-attention only) before this step

    @property
    def forwarded(self) -> Tuple[int, ...]:
        """Chunks present in the model input, in order (the clean re-forward first)."""
        return ((self.clean_chunk,) if self.clean_chunk is not None else ()) + self.chunks

    @property
    def slice_point(self) -> int:
        """First chunk present in the input; earlier ones come from the KV cache."""
        return self.forwarded[0]

    @property
    def range_num(self) -> int:
        """One past the last chunk in the call."""
        return self.chunks[-1] + 1


def lookback(step_index: int, steps: int, noise2clean_kvrange: Sequence[int], clean_chunk_kvrange: int) -> Optional[int]:
    """How many chunks (itself included) a chunk at grid index `step_index` attends to; None = all before it.

    A clean re-forward (index == steps) uses `clean_chunk_kvrange`; a denoising chunk uses the entry of
    `noise2clean_kvrange` for the quarter (generally: 1/len) of its steps it is in.
    """
    if step_index == steps:
        return clean_chunk_kvrange if clean_chunk_kvrange >= 1 else None
    if not noise2clean_kvrange:
        return None
    per_entry = steps // len(noise2clean_kvrange)
    return noise2clean_kvrange[step_index // per_entry]


def staircase(
    num_chunks: int,
    window: int,
    steps: int,
    prefix_chunks: int = 0,
    noise2clean_kvrange: Sequence[int] = (5, 4, 3, 2),
    clean_chunk_kvrange: int = 1,
) -> List[StepPlan]:
    if num_chunks < 1 or window < 1 or steps < 1:
        raise ValueError(f"num_chunks ({num_chunks}), window ({window}) and steps ({steps}) must be >= 1")
    if steps % window:
        raise ValueError(f"steps ({steps}) must be divisible by window ({window})")
    if noise2clean_kvrange and steps % len(noise2clean_kvrange):
        raise ValueError(f"steps ({steps}) must be divisible by len(noise2clean_kvrange) ({len(noise2clean_kvrange)})")
    if not 0 <= prefix_chunks < num_chunks:
        raise ValueError(f"prefix_chunks ({prefix_chunks}) must be in [0, num_chunks={num_chunks})")
    per_stage = steps // window
    off = prefix_chunks
    plans = []
    for step in range(per_stage * (num_chunks + window - 1 - off)):
        stage, idx = divmod(step, per_stage)
        newest = off + stage
        c0, c1 = max(off, newest - window + 1), min(num_chunks, newest + 1)
        j1 = min(window, newest - off + 1)
        chunks = tuple(range(c0, c1))
        # The oldest chunk is the most denoised: stage offsets (j1-1)..(j1-len), plus the step inside the stage.
        ks = tuple((j1 - 1 - m) * per_stage + idx for m in range(len(chunks)))
        clean = c0 - 1 if (c0 > off and idx == 0) else None

        def keys(chunk: int, k: int) -> Tuple[int, int]:
            r = lookback(k, steps, noise2clean_kvrange, clean_chunk_kvrange)
            return (0 if r is None else max(0, chunk + 1 - r), chunk + 1)

        kv = ((keys(clean, steps),) if clean is not None else ()) + tuple(keys(c, k) for c, k in zip(chunks, ks))
        emit = c0 if ks[0] == steps - 1 else None
        plans.append(StepPlan(step, chunks, ks, clean, kv, emit, extract_prefix=(step == 0 and off > 0)))
    return plans
