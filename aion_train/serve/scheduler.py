"""One worker thread owns the model and runs the engine; requests queue jobs for it.

Batching is static: the worker takes the oldest job, adds the jobs queued behind it while
their rows fit in `max_batch` (a job's rows always run together), and runs them as one
batch (rows of different lengths share it: engine.py). Jobs that arrive while a batch runs
wait for the next one (continuous batching, joining a running batch, is not done yet).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .engine import Engine, Row

log = logging.getLogger(__name__)


@dataclass
class Job:
    rows: list[Row]
    on_error: Callable[[BaseException], None] | None = None
    on_done: Callable[[], None] | None = None  # after the batch, error or not
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 8):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.engine = engine
        self.max_batch = max_batch
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pending: Job | None = None
        self.batches = 0  # how many engine runs (for tests and metrics)
        self.last_batch_rows = 0

    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="aion-serve-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> Job:
        if self._thread is None:
            raise RuntimeError("the scheduler is not running")
        self._q.put(job)
        return job

    def run_now(self, rows: list[Row]) -> list[Row]:
        """Run rows in the calling thread (the `generate` command: no server, no queue)."""
        return self.engine.run_guarded(rows)

    def _take(self) -> list[Job] | None:
        first = self._pending or self._q.get()
        self._pending = None
        if first is None:
            return None
        jobs, n = [first], len(first.rows)
        while n < self.max_batch:
            try:
                nxt = self._q.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._q.put(None)
                break
            if n + len(nxt.rows) > self.max_batch:
                self._pending = nxt
                break
            jobs.append(nxt)
            n += len(nxt.rows)
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            rows = [r for j in jobs for r in j.rows]
            self.batches += 1
            self.last_batch_rows = len(rows)
            try:
                self.engine.run_guarded(rows)
            except BaseException as e:  # noqa: BLE001 - reported to every request of the batch
                log.exception("generation failed")
                for j in jobs:
                    j.error = e
                    if j.on_error is not None:
                        try:
                            j.on_error(e)
                        except Exception:  # noqa: BLE001 - the worker must keep running
                            log.exception("on_error callback failed")
            for j in jobs:
                j.done.set()
                if j.on_done is not None:
                    try:
                        j.on_done()
                    except Exception:  # noqa: BLE001 - a closed event loop must not stop the worker
                        log.exception("on_done callback failed")
