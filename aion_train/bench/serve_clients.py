"""The client side of `bench serve`, in its own process (so that its event loop does not share
the server's interpreter lock): C concurrent clients, each sending its requests one after
the other as streamed `/v1/completions` calls, timed at every chunk."""

from __future__ import annotations

import asyncio
import json
import time


async def _one_request(client, url: str, body: dict) -> dict:
    """Send one streamed completion; times (s, from the send) of every chunk with text."""
    t0 = time.perf_counter()
    times: list[float] = []
    usage = None
    finish = None
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice.get("text"):
                    times.append(time.perf_counter() - t0)
                finish = choice.get("finish_reason") or finish
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk")
    return {"chunk_s": times, "tokens": usage["completion_tokens"], "finish": finish}


async def _run(base_url: str, prompts: list[list[int]], clients: int, per_client: int, body: dict) -> dict:
    import httpx

    url = base_url + "/v1/completions"
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def one_client(c: int) -> list[dict]:
            out = []
            for r in range(per_client):
                prompt = prompts[(c * per_client + r) % len(prompts)]
                out.append(await _one_request(client, url, {**body, "prompt": prompt}))
            return out

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    requests = [r for rs in results for r in rs]
    return {"wall_s": wall, "requests": requests}


def run_clients(base_url: str, prompts: list[list[int]], clients: int, per_client: int, body: dict) -> dict:
    return asyncio.run(_run(base_url, prompts, clients, per_client, body))


def client_worker(conn) -> None:
    """Serve run_clients calls sent over a multiprocessing Pipe until None arrives."""
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            conn.send(("ok", run_clients(**job)))
        except Exception as e:  # noqa: BLE001  (reported to the bench, which raises it)
            conn.send(("error", f"{type(e).__name__}: {e}"))
