"""One worker thread owns the model and runs the engine; requests queue jobs for it.

Continuous batching: between two decode steps the worker admits the queued jobs whose rows
still fit in `max_batch` (a job's rows always join together), prefills their prompts as one
pass and merges them into the running batch (engine.py); a finished row leaves the batch at
the step it ends, and a job is done when its last row is. A job that does not fit waits at
the head of the queue (first come, first served). An error in a prefill fails the jobs of
that prefill only; an error in a decode step fails every job of the batch.

The worker computes with `threads` intra-op threads (torch's thread count is per thread, so
the rest of the process keeps its own): by default the engine's execution policy's
`serving_threads(in_process=False)`, which leaves a core to the HTTP side (docs/notes.md,
bench serve). engine_process.py runs this same loop in a process of its own.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .engine import Batch, Engine, Row, fail_rows

log = logging.getLogger(__name__)


@dataclass
class Job:
    rows: list[Row]
    on_error: Callable[[BaseException], None] | None = None
    on_done: Callable[[], None] | None = None  # after the batch, error or not
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 8, threads: int | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 (got {threads})")
        self.engine = engine
        # 0: the thread count the worker inherits (the execution policy leaves it alone)
        self.threads = threads if threads is not None else engine.execution.serving_threads(in_process=False)
        self.max_batch = max_batch
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pending: Job | None = None
        self.batches = 0  # prefills: groups of jobs admitted together (for tests and metrics)
        self.steps = 0  # decode steps
        self.last_batch_rows = 0
        # objects with hold() / release(), told when an iteration starts and ends (loop_bridge.py)
        self.listeners: list = []

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

    def run_here(self) -> None:
        """Run the worker loop in the calling thread until `ask_stop` (engine_process.py: the
        child's main thread, the one whose OpenMP pool the model's packing already made; a
        second thread computing would make a second pool, oversubscribing the cores)."""
        self._loop()

    def ask_stop(self) -> None:
        """End `run_here` after its current iteration (running jobs fail as when stopping)."""
        self._q.put(None)

    def _queue_job(self, job: Job) -> Job:
        self._q.put(job)
        return job

    def down_reason(self) -> str | None:
        """None while the worker thread runs, else why it does not."""
        if self._thread is None:
            return "the scheduler is not running"
        return None if self._thread.is_alive() else "the engine worker thread has exited"

    def submit(self, job: Job) -> Job:
        if self._thread is None:
            raise RuntimeError("the scheduler is not running")
        return self._queue_job(job)

    def run_now(self, rows: list[Row]) -> list[Row]:
        """Run rows in the calling thread (the `generate` command: no server, no queue)."""
        return self.engine.run_guarded(rows)

    def _admit(self, room: int, block: bool) -> list[Job] | None:
        """Jobs from the queue whose rows fit in `room` (None: stop was asked)."""
        jobs: list[Job] = []
        while True:
            if self._pending is not None:
                nxt, self._pending = self._pending, None
            else:
                try:
                    nxt = self._q.get() if block and not jobs else self._q.get_nowait()
                except queue.Empty:
                    return jobs
            if nxt is None:
                return None
            if jobs and len(nxt.rows) > room:
                self._pending = nxt
                return jobs
            jobs.append(nxt)
            room -= len(nxt.rows)  # a job larger than max_batch still runs, alone
            if room <= 0:
                return jobs

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        log.info("engine worker: %d intra-op threads", torch.get_num_threads())
        batch: Batch | None = None
        running: list[Job] = []
        while True:
            size = 0 if batch is None else len(batch.rows)
            new = self._admit(self.max_batch - size, block=batch is None) if size < self.max_batch else []
            if new is None:
                fail_rows([r for j in running for r in j.rows])
                self._finish(running, RuntimeError("the server is stopping"))
                return
            listeners = list(self.listeners)
            for li in listeners:
                li.hold()
            try:
                batch, running = self._iteration(batch, running, new)
            finally:
                for li in listeners:
                    li.release()

    def _iteration(self, batch: Batch | None, running: list[Job], new: list[Job]):
        """Admit `new` (one prefill merged into the batch), one decode step, end the jobs that are done."""
        if new:
            rows = [r for j in new for r in j.rows]
            try:
                batch = self.engine.merge(batch, self.engine.prefill(rows))
                running += new
                self.batches += 1
            except BaseException as e:  # noqa: BLE001 - reported to the jobs of this prefill
                log.exception("prefill failed")
                fail_rows(rows)
                self._finish(new, e)
        if batch is not None:
            self.last_batch_rows = len(batch.rows)
            try:
                batch = self.engine.step(batch)
                self.steps += 1
            except BaseException as e:  # noqa: BLE001 - reported to every request of the batch
                log.exception("generation failed")
                fail_rows([r for j in running for r in j.rows])
                self._finish(running, e)
                batch, running = None, []
        done = [j for j in running if all(r.finish_reason is not None for r in j.rows)]
        if done:
            running = [j for j in running if j not in done]
            self._finish(done, None)
        return batch, running

    def _finish(self, jobs: list[Job], error: BaseException | None) -> None:
        for j in jobs:
            if error is not None:
                j.error = error
                if j.on_error is not None:
                    try:
                        j.on_error(error)
                    except Exception:  # noqa: BLE001 - the worker must keep running
                        log.exception("on_error callback failed")
            j.done.set()
            if j.on_done is not None:
                try:
                    j.on_done()
                except Exception:  # noqa: BLE001 - a closed event loop must not stop the worker
                    log.exception("on_done callback failed")
