"""A bounded load test of `aion-train serve` on loopback: two rounds of concurrent clients
(httpx async) sending completions and chat, streamed and not, some with two choices, some
invalid, some hanging up mid-stream. Every request gets a complete answer or a clean error;
afterwards no request is in flight and no generation job is left in the engine; the audit
log has one record per request and verifies; the server's RSS returns near its baseline.

Memory: the baseline is taken after a warm-up (the engine's buffers, the allocator's arenas
and the tokenizer caches are there after the first requests). Freed memory is not always
returned to the OS (glibc keeps arenas, torch's CPU allocator keeps blocks), so a rise after
the first round up to MEM_ROUND_1 is allowed; a leak shows as growth from round to round,
and the second round may add at most MEM_ROUND_2.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")

from serve_fixtures import CHAT, REPO, _env, cli, free_port  # noqa: E402

pytestmark = pytest.mark.slow

CLIENTS = 24
PER_ROUND = 160
MEM_ROUND_1 = 64 << 20  # bytes over the warmed-up baseline after the first round
MEM_ROUND_2 = 24 << 20  # bytes the second round may add to the first


def _serve(checkpoint, port, audit_log):
    return subprocess.Popen(
        [sys.executable, "-m", "aion_train.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
        + ["--audit-log", str(audit_log), "--max-batch", "8", "--log-level", "warning"],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_up(proc, url: str) -> None:
    deadline = time.time() + 120
    with httpx.Client(trust_env=False) as c:
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                if c.get(url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "serve did not come up"
            time.sleep(0.2)


def _gauge(metrics: str, name: str) -> float:
    (line,) = [ln for ln in metrics.splitlines() if ln.startswith(name + " ")]
    return float(line.split()[-1])


def _request(rng: random.Random, model: str) -> tuple[str, dict, str]:
    """(path, body, kind): kind is ok | stream | hangup | invalid."""
    r = rng.random()
    mt = rng.randint(1, 40)
    if r < 0.1:
        bad = rng.choice([{"temperature": 9}, {"n": 0}, {"nope": 1}, {"max_tokens": 10**6}])
        return "/v1/completions", {"model": model, "prompt": "scene: a", **bad}, "invalid"
    chat = rng.random() < 0.5
    body = {"model": model, "max_tokens": mt, "seed": rng.randint(0, 99), "temperature": rng.choice([0.0, 0.8])}
    body.update({"messages": CHAT} if chat else {"prompt": rng.choice(["scene: a red", "is there a", "scene:"])})
    if rng.random() < 0.2:
        body["n"] = 2
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if r < 0.35:
        return path, {**body, "stream": True}, "stream"
    if r < 0.55:
        return path, {**body, "stream": True, "max_tokens": 80}, "hangup"
    return path, body, "ok"


async def _one(client, path: str, body: dict, kind: str, rng: random.Random) -> str:
    if kind in ("stream", "hangup"):
        async with client.stream("POST", path, json=body) as resp:
            assert resp.status_code == 200, (resp.status_code, await resp.aread())
            events, done, chunks = [], False, 0
            async for line in resp.aiter_lines():
                if not line:
                    continue
                assert line.startswith("data: ") and not done, line
                if line == "data: [DONE]":
                    done = True
                    continue
                events.append(json.loads(line[6:]))
                chunks += 1
                if kind == "hangup" and chunks >= rng.randint(2, 6):
                    return "hung up"  # leaving the block closes the connection mid-stream
            assert done and "error" not in events[-1], events[-1]
            finished = {c["index"] for ev in events for c in ev["choices"] if c.get("finish_reason")}
            assert finished == set(range(body.get("n", 1))) and "aion" in events[-1]
            return "streamed"
    resp = await client.post(path, json=body)
    if kind == "invalid":
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["message"]
        return "refused"
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert len(out["choices"]) == body.get("n", 1)
    assert all(c["finish_reason"] in ("stop", "length") for c in out["choices"])
    return "answered"


async def _round(url: str, model: str, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    work = [_request(rng, model) for _ in range(PER_ROUND)]
    todo: asyncio.Queue = asyncio.Queue()
    for w in work:
        todo.put_nowait(w)
    tally: dict[str, int] = {}

    async def client_task(i: int):
        r = random.Random(seed * 1000 + i)
        limits = httpx.Limits(max_connections=2)
        async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False, limits=limits) as client:
            while not todo.empty():
                path, body, kind = todo.get_nowait()
                got = await _one(client, path, body, kind, r)
                tally[got] = tally.get(got, 0) + 1

    await asyncio.wait_for(asyncio.gather(*(client_task(i) for i in range(CLIENTS))), timeout=120)
    return tally


def test_hundreds_of_requests_from_many_clients_then_memory_and_jobs_settle(runs, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "audit.jsonl"
    proc = _serve(runs["sft"], port, log)
    try:
        _wait_up(proc, url)
        http = httpx.Client(base_url=url, timeout=60, trust_env=False)
        model = http.get("/v1/models").json()["data"][0]["id"]
        server = psutil.Process(proc.pid)
        asyncio.run(_round(url, model, seed=0))  # warm-up
        settle = _settled(http)
        base = server.memory_info().rss
        t0 = time.monotonic()
        t1 = asyncio.run(_round(url, model, seed=1))
        _settled(http)
        rss1 = server.memory_info().rss
        t2 = asyncio.run(_round(url, model, seed=2))
        _settled(http)
        rss2 = server.memory_info().rss
        took = time.monotonic() - t0
        print(
            f"rounds {t1} {t2} in {took:.1f}s; rss MB base {base / 2**20:.0f} r1 {rss1 / 2**20:.0f} r2 {rss2 / 2**20:.0f}"
        )
        assert took < 120
        for t in (t1, t2):
            assert sum(t.values()) == PER_ROUND and t.get("hung up", 0) > 10 and t.get("streamed", 0) > 10
        assert rss1 - base < MEM_ROUND_1, (base, rss1)
        assert rss2 - rss1 < MEM_ROUND_2, (rss1, rss2)
        assert settle == (0.0, 0.0)
        http.close()
    finally:
        proc.terminate()
        proc.wait(60)
    recs = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert len(recs) == 3 * PER_ROUND  # one per completion/chat request, hung up or not
    assert {r["status"] for r in recs} <= {200, 400, 499} and any(r["status"] == 499 for r in recs)
    assert cli("audit", "verify", str(log)).returncode == 0


def _settled(http, timeout: float = 30.0) -> tuple[float, float]:
    """(requests in flight, open engine jobs) once both are 0, or what they were at the end."""
    deadline = time.time() + timeout
    while True:
        m = http.get("/metrics").text
        now = (_gauge(m, "aion_requests_in_flight") - 1.0, _gauge(m, "aion_engine_jobs"))  # - this request
        if now == (0.0, 0.0) or time.time() > deadline:
            time.sleep(0.5)  # let freed buffers go back before reading RSS
            return now
        time.sleep(0.1)
