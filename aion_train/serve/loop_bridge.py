"""Items from the engine's worker thread to asyncio queues of one event loop, with one wake-up
of the loop per scheduler iteration instead of one per row and token.

While the worker is inside an iteration (prefill and/or a decode step and the jobs it ends) the
items its callbacks put are held; at the end of the iteration they go to the loop in one
`call_soon_threadsafe`. A put from any other thread is delivered at once. Holding is per thread
(a thread-local flag), so only the worker's own puts wait for its iteration to end.
"""

from __future__ import annotations

import asyncio
import threading


def _deliver(items: list) -> None:
    for q, item in items:
        q.put_nowait(item)


class LoopClosed(RuntimeError):
    """The event loop the items were meant for is gone (server shutdown)."""


class LoopBridge:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: list = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self.closed = False
        self.wakeups = 0  # deliveries scheduled on the loop (for tests and metrics)

    def hold(self) -> None:
        self._local.held = True

    def release(self) -> None:
        self._local.held = False
        self.flush()

    def put(self, q: asyncio.Queue, item) -> None:
        if self.closed:
            raise LoopClosed("the event loop is gone")
        with self._lock:
            self._items.append((q, item))
        if not getattr(self._local, "held", False):
            self.flush()

    def flush(self) -> None:
        with self._lock:  # held while scheduling too: deliveries keep the order of the puts
            items, self._items = self._items, []
            if not items or self.closed:
                return
            try:
                self.loop.call_soon_threadsafe(_deliver, items)
                self.wakeups += 1
            except RuntimeError:  # the loop is closed
                self.closed = True
