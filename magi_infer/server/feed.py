"""An append-only, thread-to-asyncio feed: what a running job produces, replayable from the start.

The worker thread appends items (the mp4's bytes as the muxer writes them, and JSON events: progress, chunk,
prompt_applied); any number of asyncio readers follow it from item 0, so a reader that connects late still gets
everything from the start, in order, without gaps. Appending never blocks on a reader: a waiting reader is woken
with `call_soon_threadsafe` on its own loop.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, List, Optional, Set, Tuple, Union

Item = Union[bytes, dict]


class Feed:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: List[Item] = []
        self._closed = False
        self._waiters: Set[Tuple[asyncio.AbstractEventLoop, asyncio.Future]] = set()
        self.nbytes = 0

    def append(self, item: Item) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("append to a closed Feed")
            self._items.append(item)
            if isinstance(item, bytes):
                self.nbytes += len(item)
            waiters, self._waiters = self._waiters, set()
        _wake(waiters)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            waiters, self._waiters = self._waiters, set()
        _wake(waiters)

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    def data(self) -> bytes:
        """All bytes so far, concatenated."""
        with self._lock:
            return b"".join(i for i in self._items if isinstance(i, bytes))

    async def follow(self, start: int = 0) -> AsyncIterator[Item]:
        """Every item from `start` on, waiting for new ones, until the feed is closed."""
        index = start
        loop = asyncio.get_running_loop()
        while True:
            waiter: Optional[asyncio.Future] = None
            with self._lock:
                new = self._items[index:]
                if not new:
                    if self._closed:
                        return
                    waiter = loop.create_future()
                    self._waiters.add((loop, waiter))
            if waiter is not None:
                try:
                    await waiter
                finally:
                    with self._lock:
                        self._waiters.discard((loop, waiter))
                continue
            index += len(new)
            for item in new:
                yield item


def _wake(waiters) -> None:
    for loop, future in waiters:
        try:
            loop.call_soon_threadsafe(_resolve, future)
        except RuntimeError:  # that reader's loop is closed: nobody is waiting any more
            pass


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
