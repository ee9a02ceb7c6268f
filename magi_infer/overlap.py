"""Decoding and writing chunk n while chunk n+1 denoises: one background worker with a bounded queue.

The sampler yields a chunk as soon as it is clean; the engine hands it to `ChunkWorker`, whose thread runs the
VAE decode and the mp4 write of each chunk in order while the main thread goes on with the DiT. The queue is
bounded (`depth` chunks waiting), so a slow decoder holds back the sampler instead of piling up latents. A failure
in the worker is raised in the caller (the same exception), at its next `submit` or at `finish`; once failed,
the worker drops what is still queued. The result is the sequential one: the same operations on
the same tensors, in the same order, only on another thread.

On CUDA the worker runs on its own stream, which first waits for the main stream's work on the latent (an
event recorded at `submit`), so the decode kernels run beside the DiT's instead of queueing behind them.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Optional

import torch

_STOP = object()


class ChunkWorker:
    def __init__(self, fn: Callable[[Any], None], depth: int = 2, name: str = "decode-and-write"):
        if depth < 1:
            raise ValueError(f"ChunkWorker depth must be >= 1, got {depth}")
        self._fn = fn
        self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self._error: Optional[BaseException] = None
        self._cancelled = threading.Event()
        self._stream = None  # the CUDA side stream, made on the first CUDA latent
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side
    def submit(self, item: Any, tensor: Optional[torch.Tensor] = None) -> None:
        """Queue `item` (blocks while `depth` items wait). `tensor`: the CUDA tensor the item's work reads, made
        on the current stream (the worker's stream waits for it)."""
        self._raise_if_failed()
        event = None
        if tensor is not None and tensor.is_cuda:
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=tensor.device)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(tensor.device))
            tensor.record_stream(self._stream)  # the allocator keeps it until the side stream is done with it
        while True:
            try:
                self._queue.put((item, event), timeout=0.1)
                return
            except queue.Full:  # the worker is busy (or failed: then stop waiting for room)
                self._raise_if_failed()

    def finish(self) -> None:
        """Wait until every queued item is done; raise the worker's failure, if any."""
        self._queue.put(_STOP)
        self._thread.join()
        self._raise_if_failed()

    def cancel(self) -> None:
        """Stop after the current item, dropping the rest (the caller failed)."""
        self._cancelled.set()
        self._queue.put(_STOP)
        self._thread.join()

    def __enter__(self) -> "ChunkWorker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        elif self._thread.is_alive():
            self.cancel()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error  # the worker's own exception, its traceback through the worker's frames

    # ------------------------------------------------------------------ worker side
    def _run(self) -> None:
        while True:
            got = self._queue.get()
            if got is _STOP:
                return
            if self._error is not None or self._cancelled.is_set():
                continue  # drain, so that a blocked submit or finish returns
            item, event = got
            try:
                if event is None:
                    self._fn(item)
                else:
                    with torch.cuda.stream(self._stream):
                        self._stream.wait_event(event)
                        self._fn(item)
                    self._stream.synchronize()
            except BaseException as e:  # noqa: BLE001 - handed to the caller, who decides
                self._error = e
