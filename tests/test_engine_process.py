"""The engine in its own process (serve/engine_process.py) against the same engine in a thread
of this process: the same tokens, log-probabilities and endings for greedy and seeded rows,
rows stopped by their sink, errors raised in the child, a child that dies, weights shared and
not copied. A tiny random model; each test starts one engine process."""

from __future__ import annotations

import os
import random
import signal

import pytest
from test_serve_units import tiny_model_cfg

from aion_train.model import build_model
from aion_train.model.execution import ExecutionPolicy
from aion_train.serve.engine import Engine, Row
from aion_train.serve.engine_process import EngineProcess, EngineProcessError
from aion_train.serve.sampling import SamplingParams, choice_generator
from aion_train.serve.scheduler import Job, Scheduler

EXECUTION = ExecutionPolicy.for_device("cpu").for_generation()


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_model_cfg().model, seed=3).eval()


@pytest.fixture
def remote(model):
    proc = EngineProcess(model, eos_ids=(), vocab_size=None, execution=EXECUTION, max_batch=4, threads=1).start()
    yield proc
    proc.stop()


def _rows(prompts, params, max_new, seed=11, **kw):
    return [
        Row(
            prompt_ids=p,
            params=params,
            max_new=max_new,
            generator=None if params.greedy else choice_generator(seed, i),
            **kw,
        )
        for i, p in enumerate(prompts)
    ]


def _wait(sched, rows) -> Job:
    job = sched.submit(Job(rows=rows))
    assert job.done.wait(60), "the job did not finish"
    return job


def _same(got, want) -> None:
    """Tokens, endings and top ids exactly; log-probabilities to 1e-4 (a batch of rows and a row
    alone round fp32 sums differently)."""
    for a, b in zip(got, want, strict=True):
        assert (a.tokens, a.finish_reason) == (b.tokens, b.finish_reason)
        for x, y in zip(a.infos, b.infos, strict=True):
            assert (x is None) == (y is None)
            if x is not None:
                assert [t for t, _ in x.top] == [t for t, _ in y.top]
                assert [x.logprob, *(v for _, v in x.top)] == pytest.approx(
                    [y.logprob, *(v for _, v in y.top)], abs=1e-4
                )


def test_process_engine_gives_the_threads_tokens_logprobs_and_endings(model, remote):
    rng = random.Random(0)
    prompts = [[rng.randrange(4, 400) for _ in range(n)] for n in (3, 11, 7, 1, 9, 5)]
    cases = [
        (SamplingParams(temperature=0.0), 12),
        (SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=11, logprobs=2), 10),
    ]
    local = Scheduler(Engine(model, eos_ids=(), execution=EXECUTION), max_batch=4, threads=1).start()
    try:
        for params, n in cases:
            want = _rows(prompts, params, n)
            for r in want:  # more rows than max_batch: the rest join at step boundaries
                _wait(local, [r])
            got = _rows(prompts, params, n)
            jobs = [remote.submit(Job(rows=[r])) for r in got]
            assert all(j.done.wait(60) and j.error is None for j in jobs)
            _same(got, want)
            assert all(r.finish_reason == "length" and len(r.tokens) == n for r in got)
        # echo with logprobs: the prompt is scored in the child and comes back with the row
        echo = SamplingParams(temperature=0.0, logprobs=1, echo=True)
        want, got = _rows(prompts[:2], echo, 3, prompt_logprobs=True), _rows(prompts[:2], echo, 3, prompt_logprobs=True)
        _wait(local, want)
        _wait(remote, got)
        for a, b in zip(want, got):
            assert b.prompt_infos[0] is None and a.prompt_infos[0] is None
            assert [i.logprob for i in b.prompt_infos[1:]] == pytest.approx(
                [i.logprob for i in a.prompt_infos[1:]], abs=1e-4
            )
            assert len(b.prompt_infos) == len(b.prompt_ids)
    finally:
        local.stop()
    assert remote.steps > 0 and remote.batches > 0


def test_a_sink_that_stops_its_row_ends_it_at_once_and_the_child_stops_it(remote):
    greedy = SamplingParams(temperature=0.0)
    seen: list[int] = []
    finished: list[str] = []

    def sink(tok, info):
        seen.append(tok)
        return len(seen) == 3  # a stop string, a client gone

    row = Row(
        prompt_ids=[5, 6, 7],
        params=greedy,
        max_new=200,
        sink=sink,
        on_finish=lambda r: finished.append(r.finish_reason),
    )
    other = Row(prompt_ids=[8, 9], params=greedy, max_new=6)
    job = _wait(remote, [row, other])
    assert job.error is None
    assert row.finish_reason == "stop" and finished == ["stop"]
    assert len(row.tokens) == 3 == len(seen)  # tokens the child made after the stop are dropped
    assert other.finish_reason == "length" and len(other.tokens) == 6
    assert remote.steps < 20  # the child stopped decoding the row long before its max_new


def test_an_error_in_the_child_fails_its_job_and_the_engine_goes_on(remote):
    greedy = SamplingParams(temperature=0.0)
    bad = Row(prompt_ids=[5, 10_000], params=greedy, max_new=4)  # an id past the vocabulary
    errors: list[BaseException] = []
    job = remote.submit(Job(rows=[bad], on_error=errors.append))
    assert job.done.wait(60)
    assert isinstance(job.error, EngineProcessError) and errors == [job.error]
    assert job.error.type_name in ("IndexError", "RuntimeError")
    assert bad.finish_reason == "error"
    ok = Row(prompt_ids=[5, 6], params=greedy, max_new=4)
    assert _wait(remote, [ok]).error is None and len(ok.tokens) == 4


def test_a_dead_engine_process_fails_open_jobs_and_refuses_new_ones(model):
    proc = EngineProcess(model, eos_ids=(), vocab_size=None, execution=EXECUTION, max_batch=2, threads=1).start()
    try:
        greedy = SamplingParams(temperature=0.0)
        row = Row(prompt_ids=[5, 6], params=greedy, max_new=90)  # the tiny model's context is 96
        job = proc.submit(Job(rows=[row]))
        os.kill(proc._proc.pid, signal.SIGKILL)
        assert job.done.wait(30)
        assert job.error is not None and "engine process is gone" in str(job.error)
        assert row.finish_reason in ("error", "length")
        with pytest.raises(RuntimeError, match="engine process is not running"):
            proc.submit(Job(rows=[Row(prompt_ids=[5], params=greedy, max_new=2)]))
    finally:
        proc.stop()


def test_the_weights_are_shared_with_the_child_not_copied(model, remote):
    # the child holds the same storage: moved to shared memory once, in place
    assert all(p.is_shared() for p in model.parameters())
    row = Row(prompt_ids=[5, 6, 7], params=SamplingParams(temperature=0.0), max_new=5)
    _wait(remote, [row])
    ref = Engine(model, eos_ids=(), execution=EXECUTION)
    local = Row(prompt_ids=[5, 6, 7], params=SamplingParams(temperature=0.0), max_new=5)
    ref.run([local])
    assert row.tokens == local.tokens
