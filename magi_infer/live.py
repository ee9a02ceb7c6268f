"""Live chunk-wise prompting: change the prompt of the chunks still to come while a video is being generated.

MAGI-1 generates chunk by chunk, and each chunk's caption enters the DiT only while that chunk is denoised (the
KV cache holds self-attention keys of clean chunks, computed with the null caption). So a prompt given before
chunk k *starts* denoising can condition chunk k and every chunk after it, and the video is then exactly the one
a request with the prompt list [p0, ..., p(k-1), new] would have given: nothing already computed is touched.

`LivePrompts` is the mailbox between whoever types the prompt (a WebSocket handler, a UI thread) and the thread
running the sampler. The engine polls it after every sampler step (`take`), applies what it finds to the first
chunk that has not started, and records that in `applied`.
"""

from __future__ import annotations

import threading
from typing import List, Optional, Tuple


class LivePrompts:
    """Thread-safe: `set` from any thread; the generating thread calls `take` and `mark_*`.

    Only the newest prompt set between two sampler steps counts (an earlier one had no chunk to condition)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: Optional[str] = None
        self._applied: List[Tuple[int, str]] = []
        self._started = -1

    def set(self, prompt: str) -> None:
        """The prompt of the next chunk that has not started denoising yet, and of every chunk after it."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"a live prompt must be a non-empty string, got {prompt!r}")
        with self._lock:
            self._pending = prompt

    @property
    def applied(self) -> List[Tuple[int, str]]:
        """(generated chunk index, prompt) for every update applied so far, in order."""
        with self._lock:
            return list(self._applied)

    @property
    def started(self) -> int:
        """Index of the newest generated chunk that has started denoising (-1 before the first)."""
        with self._lock:
            return self._started

    # ------------------------------------------------------------------ the generating thread's side
    def take(self) -> Optional[str]:
        with self._lock:
            prompt, self._pending = self._pending, None
            return prompt

    def mark_started(self, chunk: int) -> None:
        with self._lock:
            self._started = max(self._started, chunk)

    def mark_applied(self, chunk: int, prompt: str) -> None:
        with self._lock:
            self._applied.append((chunk, prompt))


def collapse(prompts: List[str]) -> List[str]:
    """One prompt per generated chunk -> the shortest list meaning the same (the last prompt repeats), so that
    a live-updated request encodes exactly the prompts the equivalent static request would."""
    out = list(prompts)
    while len(out) > 1 and out[-1] == out[-2]:
        out.pop()
    return out


def expand(prompts: List[str], chunks: int) -> List[str]:
    """The prompt of each of `chunks` generated chunks (the last prompt repeats)."""
    return [prompts[min(i, len(prompts) - 1)] for i in range(chunks)]
