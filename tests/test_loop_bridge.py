"""LoopBridge: the worker's puts inside an iteration reach the event loop in one wake-up, in
order; other threads' puts at once; a closed loop is reported to the putter."""

import asyncio
import threading

import pytest

from aion_train.serve.loop_bridge import LoopBridge, LoopClosed


@pytest.fixture
def loop_thread():
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)
    loop.close()


def _drain(loop, queues, n_each, timeout=5.0):
    async def take():
        return [[await asyncio.wait_for(q.get(), timeout) for _ in range(n_each)] for q in queues]

    return asyncio.run_coroutine_threadsafe(take(), loop).result(timeout + 1)


def test_held_puts_arrive_in_one_wakeup_in_order(loop_thread):
    bridge = LoopBridge(loop_thread)
    queues = asyncio.run_coroutine_threadsafe(_make_queues(4), loop_thread).result(5)

    def worker():
        bridge.hold()
        for step in range(8):
            for i, q in enumerate(queues):
                bridge.put(q, (i, step))
        assert bridge.wakeups == 0  # nothing reaches the loop inside the iteration
        bridge.release()

    t = threading.Thread(target=worker)
    t.start()
    t.join(5)
    assert bridge.wakeups == 1
    got = _drain(loop_thread, queues, 8)
    assert got == [[(i, s) for s in range(8)] for i in range(4)]


def test_puts_of_a_thread_that_does_not_hold_go_at_once(loop_thread):
    bridge = LoopBridge(loop_thread)
    (q,) = asyncio.run_coroutine_threadsafe(_make_queues(1), loop_thread).result(5)
    for k in range(3):
        bridge.put(q, k)
    assert bridge.wakeups == 3
    assert _drain(loop_thread, [q], 3) == [[0, 1, 2]]


def test_a_closed_loop_is_reported_to_the_putter():
    loop = asyncio.new_event_loop()
    q = asyncio.Queue()
    loop.close()
    bridge = LoopBridge(loop)
    bridge.put(q, "lost")  # the flush finds the loop closed
    assert bridge.closed
    with pytest.raises(LoopClosed):
        bridge.put(q, "next")


async def _make_queues(n):
    return [asyncio.Queue() for _ in range(n)]
