"""Shared by the serving tests: tiny *trained* checkpoints (a real `aion-train pretrain` run
and a real `aion-train sft` run, made once per session), a policy bundle with test
jurisdictions, and `serving(...)`: the real server in-process (uvicorn on a free loopback
port, in a thread) with an `openai` client and an httpx client. `runs` and `bundle` are
session fixtures registered by conftest.py."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_POLICIES = sorted((REPO / "configs" / "policies").glob("*.json"))
VOWEL = re.compile("[aeiouAEIOU]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(
        os.environ,
        MLFLOW_DISABLE_TELEMETRY="true",
        PYTHONUNBUFFERED="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        **extra,
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    return env


def cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aion_train.cli", *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """{"pt": a pretraining run, "sft": an SFT run}, trained here (two processes at once)."""
    root = tmp_path_factory.mktemp("serve_runs")
    cmds = {
        "pt": [
            "pretrain",
            "train.steps=8",
            "train.eval_every=8",
            "train.save_every=8",
            "data.micro_batch_size=4",
            f"run_dir={root / 'pt'}",
            "--json",
        ],
        "sft": [
            "sft",
            "sft.base_steps=60",
            "sft.steps=10",
            "sft.eval_examples=8",
            "sft.batch_size=8",
            "sft.max_examples=64",
            "sft.chat_examples=16",
            f"run_dir={root / 'sft'}",
            "--json",
        ],
    }
    procs = {
        k: subprocess.Popen(
            [sys.executable, "-m", "aion_train.cli", *c],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k, c in cmds.items()
    }
    for k, p in procs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{k}: exit {p.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    return {k: root / k for k in cmds}


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    """The example policies (default, eu, eu-de) plus test jurisdictions:
    xx-novowel redacts every vowel (streams through the bounded window), xx-digits redacts
    digit runs (unbounded: held back) and appends a notice, xx-block blocks any lowercase letter."""
    from aion_train.policy import build_bundle, write_bundle

    d = tmp_path_factory.mktemp("policies")
    docs = {
        "xx-novowel": {
            "rules": [{"id": "vowels", "action": "redact", "patterns": ["[aeiouAEIOU]"], "replacement": "*"}]
        },
        "xx-digits": {
            "rules": [{"id": "digits", "action": "redact", "patterns": ["[0-9]+"], "replacement": "#"}],
            "required_notices": ["AI generated."],
        },
        "xx-block": {"rules": [{"id": "lower", "action": "block", "patterns": ["[a-z]"]}]},
    }
    files = list(EXAMPLE_POLICIES)
    for j, extra in docs.items():
        f = d / f"{j}.json"
        f.write_text(json.dumps({"jurisdiction": j, "version": "1.0.0", **extra}))
        files.append(f)
    return write_bundle(build_bundle(files), d / "bundle")


@contextmanager
def serving(
    checkpoint,
    policy=None,
    audit_log=None,
    api_key_file=None,
    max_batch=8,
    max_body_bytes=1 << 16,
    index=None,
    k=3,
    policy_poll=0.0,
    allow_unauthenticated_admin=False,
    admin_token_file=None,
):
    import httpx
    import openai
    import uvicorn

    from aion_train.commands.serve import build_server

    args = argparse.Namespace(
        checkpoint=str(checkpoint),
        tokenizer=None,
        dtype="fp32",
        model_name=None,
        policy=str(policy) if policy else None,
        api_key_file=api_key_file,
        audit_log=str(audit_log) if audit_log else None,
        max_batch=max_batch,
        max_body_bytes=max_body_bytes,
        index=str(index) if index else None,
        k=k,
        policy_poll=policy_poll,
        allow_unauthenticated_admin=allow_unauthenticated_admin,
        admin_token_file=str(admin_token_file) if admin_token_file else None,
    )
    app, service, audit = build_server(args)
    service.start()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="off")
    )
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not server.started:
        assert th.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, timeout=120, trust_env=False)
    client = openai.OpenAI(
        base_url=url + "/v1",
        api_key="none",
        max_retries=0,
        timeout=120,
        http_client=openai.DefaultHttpxClient(trust_env=False),
    )
    try:
        yield SimpleNamespace(url=url, service=service, client=client, http=http, model=service.loaded.model_id)
    finally:
        http.close()
        server.should_exit = True
        th.join(30)
        service.stop()
        if audit is not None:
            audit.close()


def sse_events(resp) -> list[dict]:
    """The JSON events of a raw SSE response; asserts it ends with data: [DONE]."""
    events, done = [], False
    for line in resp.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[6:]
        assert not done, "event after [DONE]"
        if data == "[DONE]":
            done = True
            continue
        events.append(json.loads(data))
    assert done
    return events


def stream_text(events, key="text") -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for ev in events:
        for c in ev.get("choices", []):
            piece = c["text"] if key == "text" else c.get("delta", {}).get("content")
            if piece:
                out.setdefault(c["index"], []).append(piece)
    return out


CHAT = [
    {"role": "system", "content": "answer the question about the scene."},
    {"role": "user", "content": "scene: a red circle. is there a blue shape?"},
]
