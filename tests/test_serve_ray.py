"""`aion-train serve --ray --replicas 2`: the same app as a Ray Serve deployment on a private
loopback Ray head, driven with the `openai` client through Ray Serve's proxy. Both replicas
answer, greedy output is the same whichever answers, policies and errors behave as in one
process, each replica keeps its own audit chain, and SIGINT stops every process started."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")
pytest.importorskip("ray.serve")

from serve_fixtures import CHAT, REPO, VOWEL, _env, cli, free_port  # noqa: E402

pytestmark = pytest.mark.slow


def test_two_ray_serve_replicas_serve_the_same_app(runs, bundle, tmp_path):
    port = free_port()
    keys = tmp_path / "keys"
    keys.write_text("k1\n")
    log = tmp_path / "audit.jsonl"
    cmd = [sys.executable, "-m", "aion_train.cli", "serve", "--checkpoint", str(runs["sft"]), "--port", str(port)]
    cmd += ["--ray", "--replicas", "2", "--num-cpus-per-replica", "0.5", "--policy", str(bundle)]
    cmd += ["--api-key-file", str(keys), "--audit-log", str(log), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    auth = {"authorization": "Bearer k1"}
    started: dict[int, psutil.Process] = {}
    try:
        http = httpx.Client(base_url=url, timeout=60, trust_env=False)
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            started.update({p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)})
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the Ray Serve deployment did not come up"
            time.sleep(1)
        client = openai.OpenAI(
            base_url=url + "/v1",
            api_key="k1",
            max_retries=0,
            timeout=120,
            http_client=openai.DefaultHttpxClient(trust_env=False),
        )
        model = client.models.list().data[0].id
        # concurrent greedy requests: both replicas answer, with the same text
        answers: list[tuple[str, str]] = []

        def one():
            raw = client.completions.with_raw_response.create(
                model=model, prompt="scene: a red", max_tokens=12, temperature=0
            )
            answers.append((raw.headers["x-aion-replica"], raw.parse().choices[0].text))

        def wave(n: int) -> None:
            threads = [threading.Thread(target=one) for _ in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)

        # the proxy learns of the replicas shortly after the deployment is up: warm up until
        # both have answered (bounded), then a wave of 16 at once
        deadline = time.time() + 60
        while len({r for r, _ in answers}) < 2 and time.time() < deadline:
            wave(4)
        warm = len(answers)
        wave(16)
        assert len(answers) == warm + 16
        assert len({r for r, _ in answers}) == 2, answers
        assert len({t for _, t in answers}) == 1 and answers[0][1]
        # streaming under a policy, through the proxy
        stream = client.chat.completions.create(
            model=model,
            messages=CHAT,
            max_tokens=24,
            seed=3,
            stream=True,
            extra_body={"jurisdiction": "xx-novowel"},
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text and not VOWEL.search(text)
        with pytest.raises(openai.BadRequestError, match="known jurisdictions: default"):
            client.completions.create(model=model, prompt="x", max_tokens=2, extra_body={"jurisdiction": "xx-nope"})
        assert http.get("/v1/models").status_code == 401  # the key is checked on every replica
        assert http.get("/metrics", headers=auth).status_code == 200
        for p in psutil.Process(proc.pid).children(recursive=True):
            started.setdefault(p.pid, p)
        http.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err[-4000:]
    time.sleep(2)
    alive = [p.pid for p in started.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left running: {alive}"
    logs = sorted(tmp_path.glob("audit.*.jsonl"))
    assert len(logs) == 2, logs  # one hash chain per replica
    n = 0
    for f in logs:
        assert cli("audit", "verify", str(f)).returncode == 0
        n += len([json.loads(ln) for ln in f.read_text().splitlines()])
    assert n == warm + 16 + 1 + 1  # the completions, the stream, the refused jurisdiction
