"""The engine in a process of its own: the scheduler of scheduler.py, run in a spawned child,
behind the same interface (`start`, `stop`, `submit`, `run_now`, `listeners`, `batches`,
`steps`, `last_batch_rows`, `threads`, `max_batch`).

Why: in a thread of the server, every Python step of the engine (between its ~1000 ops per
decode step) waits for the interpreter lock whenever the event loop holds it, and every
parallel region of the model then waits at its barrier for the thread that waited; measured,
a 2-thread engine in the server's process decoded at half its own speed (docs/notes.md, bench
serve). In its own process the engine computes on every core and the HTTP side's work costs it
only the CPU time that work takes.

The model reaches the child through torch.multiprocessing (its tensors moved to shared memory,
not copied); the child builds the `Engine` (execution policy, packed weights) and runs a
`Scheduler`. Requests go down as row specs (prompt, sampling parameters, random stream state,
media); what one scheduler iteration produced comes back as one message (each row's tokens,
the rows and jobs that ended, errors, media cache lookups, the counters). The parent applies it
to its own `Row` objects under the scheduler listeners (loop_bridge.py: one event-loop wake-up
per iteration): tokens reach each row's `sink` (detokenizing and the policy, here in the
parent), and a sink that stops its row (a stop string, a client gone) ends it at once here
and tells the child, whose decode of that row stops within a step or two (the tokens it made
meanwhile are dropped). If the child dies, every open job fails and new ones are refused.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass

import torch

from .engine import Row, _finish, fail_rows
from .scheduler import Job

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0


class EngineProcessError(RuntimeError):
    """An exception raised in the engine process (its type's name and message)."""

    def __init__(self, type_name: str, message: str):
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name


@dataclass
class RowSpec:
    """A Row as it travels to the child (no callbacks; its random stream as a state)."""

    key: int
    prompt_ids: list[int]
    params: object  # sampling.SamplingParams
    max_new: int
    generator_state: torch.Tensor | None
    prompt_logprobs: bool
    modality: list[int] | None
    media: list | None


class EngineProcess:
    def __init__(self, model, eos_ids, vocab_size, execution, max_batch: int = 8, threads: int | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 (got {threads})")
        self.max_batch = max_batch
        self.threads = threads if threads is not None else execution.serving_threads(in_process=True)
        self._init = (model, tuple(eos_ids), vocab_size, execution)
        self.listeners: list = []  # hold() / release() around each iteration's message (loop_bridge.py)
        self.media_listeners: list = []  # fn(kind, hit) per media cache lookup in the child
        self.batches = self.steps = self.last_batch_rows = 0
        self.media_stats = {"encodes": 0, "hits": 0}  # of the child's media cache
        self._ids = itertools.count()
        self._jobs: dict[int, Job] = {}
        self._rows: dict[int, Row] = {}
        self._lock = threading.Lock()  # the maps above and the pipe's sending end
        self._conn = self._proc = self._reader = None
        self._dead: str | None = None  # why the child is gone

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> EngineProcess:
        if self._proc is not None:
            return self
        import torch.multiprocessing as tmp

        ctx = tmp.get_context("forkserver")
        ctx.set_forkserver_preload(["aion_train.serve.engine"])
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_child_main,
            args=(child, *self._init, self.max_batch, self.threads),
            name="aion-serve-engine",
            daemon=True,
        )
        self._proc.start()
        child.close()
        if not self._conn.poll(START_TIMEOUT_S):
            self._kill()
            raise RuntimeError(f"the engine process did not start within {START_TIMEOUT_S:.0f} s")
        try:
            msg = self._conn.recv()
        except EOFError:
            msg = ("fatal", f"it exited with code {self._proc.exitcode}")
        if msg[0] != "ready":
            self._kill()
            raise RuntimeError(f"the engine process failed to start: {msg[1]}")
        log.info("engine process %d: %d intra-op threads", self._proc.pid, msg[1]["threads"])
        self._reader = threading.Thread(target=self._read, name="aion-serve-engine-reader", daemon=True)
        self._reader.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc is None:
            return
        try:
            self._send(("stop",))
        except (OSError, RuntimeError):
            pass
        if self._reader is not None:
            self._reader.join(timeout)
        self._proc.join(timeout)
        self._kill()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.is_alive():
            proc.kill()
            proc.join(5)
        if self._conn is not None:
            self._conn.close()

    def down_reason(self) -> str | None:
        """None while the child serves, else why it does not."""
        if self._dead is not None:
            return f"the engine process is gone: {self._dead}"
        return "the engine process is not running" if self._proc is None else None

    # -- requests --------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        specs = []
        with self._lock:
            if self._proc is None or self._dead is not None:
                raise RuntimeError(f"the engine process is not running{f' ({self._dead})' if self._dead else ''}")
            job_id = next(self._ids)
            for r in job.rows:
                key = next(self._ids)
                self._rows[key] = r
                gen = None if r.generator is None else r.generator.get_state()
                specs.append(
                    RowSpec(key, r.prompt_ids, r.params, r.max_new, gen, r.prompt_logprobs, r.modality, r.media)
                )
            self._jobs[job_id] = job
            self._conn.send(("submit", job_id, specs))
        return job

    def run_now(self, rows: list[Row]) -> list[Row]:
        """Run rows to the end and wait for them (raises what generation raised)."""
        job = self.submit(Job(rows=rows))
        job.done.wait()
        if job.error is not None:
            raise job.error
        return rows

    def _send(self, msg) -> None:
        with self._lock:
            if self._conn is None:
                raise RuntimeError("the engine process is not running")
            self._conn.send(msg)

    # -- what comes back -------------------------------------------------------------------
    def _read(self) -> None:
        why = "it exited"
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                code = self._proc.exitcode if self._proc is not None else None
                why = f"it exited with code {code}" if code is not None else "its pipe closed"
                break
            if msg[0] == "bye":
                why = "the server is stopping"
                break
            _, events, stats = msg
            listeners = list(self.listeners)
            for li in listeners:
                li.hold()
            try:
                self._apply(events)
            except Exception:  # noqa: BLE001 - the reader must keep reading
                log.exception("applying the engine's results failed")
            finally:
                for li in listeners:
                    li.release()
            self.batches, self.steps, self.last_batch_rows, media = stats
            self.media_stats = {"encodes": media[0], "hits": media[1]}
        self._dead = why
        with self._lock:
            jobs, self._jobs, self._rows = list(self._jobs.values()), {}, {}
        err = RuntimeError(f"the engine process is gone: {why}")
        for job in jobs:
            fail_rows(job.rows)
            _end_job(job, err)

    def _apply(self, events: list) -> None:
        for ev in events:
            kind = ev[0]
            if kind == "tok":
                _, key, tok, info = ev
                r = self._rows.get(key)
                if r is None or r.finish_reason is not None:
                    continue  # stopped here already: the child had not heard yet
                if r.first_token_at is None:
                    r.first_token_at = time.monotonic()
                r.tokens.append(tok)
                r.infos.append(info)
                if r.sink is not None and r.sink(tok, info):
                    _finish(r, "stop")
                    self._send(("cancel", key))
            elif kind == "fin":
                _, key, reason, prompt_infos = ev
                with self._lock:
                    r = self._rows.pop(key, None)
                if r is not None and r.finish_reason is None:
                    r.prompt_infos = prompt_infos
                    _finish(r, reason)
            elif kind == "err":
                _, job_id, type_name, message = ev
                job = self._jobs.get(job_id)
                if job is not None:
                    fail_rows(job.rows)
                    job.error = EngineProcessError(type_name, message)
                    if job.on_error is not None:
                        try:
                            job.on_error(job.error)
                        except Exception:  # noqa: BLE001
                            log.exception("on_error callback failed")
            elif kind == "done":
                with self._lock:
                    job = self._jobs.pop(ev[1], None)
                if job is not None:
                    _end_job(job, None)
            elif kind == "media":
                for fn in list(self.media_listeners):
                    fn(ev[1], ev[2])


def _end_job(job: Job, error: BaseException | None) -> None:
    if error is not None and job.error is None:
        job.error = error
        if job.on_error is not None:
            try:
                job.on_error(error)
            except Exception:  # noqa: BLE001
                log.exception("on_error callback failed")
    job.done.set()
    if job.on_done is not None:
        try:
            job.on_done()
        except Exception:  # noqa: BLE001
            log.exception("on_done callback failed")


# -- the child --------------------------------------------------------------------------------
class _Outbox:
    """Events of one scheduler iteration, sent as one message when it ends (a listener)."""

    def __init__(self, conn, sched, engine):
        self.conn, self.sched, self.engine = conn, sched, engine
        self.events: list = []
        self.lock = threading.Lock()

    def add(self, ev) -> None:
        with self.lock:
            self.events.append(ev)

    def hold(self) -> None:
        pass

    def release(self) -> None:
        with self.lock:
            events, self.events = self.events, []
            if not events:
                return
            cache = self.engine.media_cache
            media = (cache.encodes, cache.hits) if cache is not None else (0, 0)
            stats = (self.sched.batches, self.sched.steps, self.sched.last_batch_rows, media)
            self.conn.send(("iter", events, stats))


def _child_main(conn, model, eos_ids, vocab_size, execution, max_batch: int, threads: int) -> None:
    """Build the engine and run the scheduler in this (main) thread; a second thread reads the
    pipe (it runs no torch op: one OpenMP pool in the process)."""
    from .engine import Engine
    from .scheduler import Scheduler

    try:
        if threads:
            torch.set_num_threads(threads)
        engine = Engine(model, eos_ids, vocab_size, execution)
        sched = Scheduler(engine, max_batch, threads or None)
        out = _Outbox(conn, sched, engine)
        sched.listeners.append(out)
        if engine.media_cache is not None:
            engine.media_cache.listeners.append(lambda kind, hit: out.add(("media", kind, hit)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    cancelled: set[int] = set()

    def receive() -> None:
        try:
            while True:
                try:
                    msg = conn.recv()
                except (EOFError, OSError):  # the server is gone
                    return
                if msg[0] == "submit":
                    sched._queue_job(_job(msg[1], msg[2], out, cancelled))
                elif msg[0] == "cancel":
                    cancelled.add(msg[1])
                elif msg[0] == "stop":
                    return
        finally:
            sched.ask_stop()

    threading.Thread(target=receive, name="aion-serve-engine-pipe", daemon=True).start()
    conn.send(("ready", {"threads": torch.get_num_threads()}))
    try:
        sched.run_here()
    finally:
        out.release()
        try:
            conn.send(("bye",))
        except (OSError, BrokenPipeError):
            pass


def _job(job_id: int, specs: list[RowSpec], out: _Outbox, cancelled: set[int]) -> Job:
    rows = []
    for s in specs:
        gen = None
        if s.generator_state is not None:
            gen = torch.Generator()
            gen.set_state(s.generator_state)

        def sink(tok, info, key=s.key):
            out.add(("tok", key, tok, info))
            return key in cancelled

        def on_finish(r, key=s.key):
            cancelled.discard(key)
            out.add(("fin", key, r.finish_reason, r.prompt_infos))

        rows.append(
            Row(
                prompt_ids=s.prompt_ids,
                params=s.params,
                max_new=s.max_new,
                generator=gen,
                sink=sink,
                on_finish=on_finish,
                prompt_logprobs=s.prompt_logprobs,
                modality=s.modality,
                media=s.media,
            )
        )
    return Job(
        rows=rows,
        on_error=lambda e: out.add(("err", job_id, type(e).__name__, str(e))),
        on_done=lambda: out.add(("done", job_id)),
    )
