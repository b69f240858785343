"""Policy hot reload on a live server (tiny trained SFT checkpoint, real HTTP): a new bundle
is swapped in while a streamed request runs and that request keeps its snapshot to the end;
a broken bundle is refused and the running one stays (admin call, Python API and the file
watcher); the admin route is refused without an API key."""

from __future__ import annotations

import json
import os
import re
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_fixtures import CHAT, VOWEL, serving, sse_events  # noqa: E402

pytestmark = pytest.mark.slow

CONSONANT = re.compile("[bcdfgBCDFG]")
AUTH = {"authorization": "Bearer k1"}


def _bundle(folder, pattern: str, version: str):
    """A bundle with jurisdiction xx-swap redacting `pattern`, written (atomically) to folder."""
    from aion_train.policy import build_bundle, write_bundle

    src = folder / f"src-{version}"
    src.mkdir(parents=True, exist_ok=True)
    f = src / "xx-swap.json"
    rule = {"id": "swap", "action": "redact", "patterns": [pattern], "replacement": "*"}
    f.write_text(json.dumps({"jurisdiction": "xx-swap", "version": version, "rules": [rule]}))
    return write_bundle(build_bundle([f]), folder / "bundle", overwrite=True)


def _keys(tmp_path):
    k = tmp_path / "keys"
    k.write_text("k1\n")
    return str(k)


def _metric(text: str, name: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(name)]


def test_a_streamed_request_keeps_its_snapshot_across_a_reload(runs, tmp_path):
    path = _bundle(tmp_path, "[aeiouAEIOU]", "1.0.0")
    log = tmp_path / "audit.jsonl"
    with serving(runs["sft"], policy=path, api_key_file=_keys(tmp_path), audit_log=log) as s:
        old = s.service.policies.bundle_sha256
        old_policy = s.service.policies["xx-swap"].sha256
        card = s.http.get("/v1/models", headers=AUTH).json()["data"][0]
        prompt_tokens = s.http.post(
            "/v1/chat/completions", headers=AUTH, json={"model": s.model, "messages": CHAT, "max_tokens": 1}
        ).json()["usage"]["prompt_tokens"]
        room = card["aion"]["max_seq_len"] - prompt_tokens
        body = {
            "model": s.model,
            "messages": CHAT,
            "stream": True,
            "max_tokens": room,
            "seed": 1,
            "temperature": 2.0,
            "n": 4,
            "jurisdiction": "xx-swap",
        }
        with s.http.stream("POST", "/v1/chat/completions", headers=AUTH, json=body) as resp:
            lines = resp.iter_lines()
            head = []
            for line in lines:
                head.append(line)
                if '"content": "' in line and '"content": ""' not in line:
                    break  # generation is running under the old bundle
            _bundle(tmp_path, "[bcdfgBCDFG]", "2.0.0")  # the same file, new content
            r = s.http.post("/admin/reload", headers=AUTH)
            steps_at_swap = s.service.scheduler.steps
            rest = list(lines)
        assert s.service.scheduler.steps > steps_at_swap, "the request was not running after the swap"
        assert r.status_code == 200, r.text
        new = r.json()
        assert new["changed"] and new["previous_bundle_sha256"] == old and new["bundle_sha256"] != old
        events = sse_events(httpx.Response(200, content="\n".join(head + rest).encode()))
        text = "".join(c["delta"].get("content") or "" for ev in events for c in ev["choices"])
        aion = events[-1]["aion"]
        assert aion["bundle_sha256"] == old and aion["policy_sha256"] == old_policy
        assert text and not VOWEL.search(text)  # the old policy to the end
        # a request after the swap gets the new bundle
        after = s.client.with_options(api_key="k1").chat.completions.create(
            model=s.model, messages=CHAT, max_tokens=40, seed=1, temperature=2.0, extra_body={"jurisdiction": "xx-swap"}
        )
        a2 = after.model_extra["aion"]
        assert a2["bundle_sha256"] == new["bundle_sha256"] and a2["policy_version"] == "2.0.0"
        assert not CONSONANT.search(after.choices[0].message.content)
        m = s.http.get("/metrics", headers=AUTH).text
        assert 'aion_policy_reloads_total{result="ok"} 1.0' in m
        assert 'aion_policy_reloads_total{result="failed"} 0.0' in m
        assert f'aion_policy_bundle_info{{bundle_sha256="{new["bundle_sha256"]}"}} 1.0' in m
        assert s.http.get("/v1/models", headers=AUTH).json()["data"][0]["aion"]["bundle_sha256"] == a2["bundle_sha256"]
    recs = [json.loads(ln) for ln in log.read_text().splitlines()]
    streamed = [r for r in recs if r["stream"]]
    assert len(streamed) == 1 and streamed[0]["bundle_sha256"] == old and streamed[0]["status"] == 200
    assert recs[-1]["bundle_sha256"] == new["bundle_sha256"]


def test_a_broken_bundle_is_refused_and_the_running_one_stays(runs, tmp_path):
    from aion_train.policy import PolicyError

    path = _bundle(tmp_path, "[aeiouAEIOU]", "1.0.0")
    with serving(runs["sft"], policy=path, api_key_file=_keys(tmp_path), policy_poll=0.1) as s:
        old = s.service.policies.bundle_sha256
        good = path.read_text()
        # 1. a rule edited by hand: the bundle no longer matches its hashes
        doc = json.loads(good)
        blob = json.dumps(doc).replace("[aeiouAEIOU]", "[0-9]")
        _atomic(path, blob)
        r = s.http.post("/admin/reload", headers=AUTH)
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_policy_bundle" and str(path) in err["message"]
        assert "sha256" in err["message"] or "hash" in err["message"], err["message"]
        # 2. not JSON, through the Python API an admin dashboard calls
        _atomic(path, '{"format": ')
        with pytest.raises(PolicyError, match="JSON"):
            s.service.reload_policies(path)
        assert s.service.policies.bundle_sha256 == old
        done = s.client.with_options(api_key="k1").completions.create(
            model=s.model, prompt="scene: a", max_tokens=8, seed=2, extra_body={"jurisdiction": "xx-swap"}
        )
        assert done.model_extra["aion"]["bundle_sha256"] == old and not VOWEL.search(done.choices[0].text)
        # 3. the file watcher saw the broken files too: refused, counted, the old bundle stays
        _wait(lambda: _failed(s) >= 3, "the watcher did not report the broken bundle")
        assert s.service.policies.bundle_sha256 == old
        # a good file again: the watcher serves it
        _bundle(tmp_path, "[bcdfgBCDFG]", "2.0.0")
        _wait(lambda: s.service.policies.bundle_sha256 != old, "the watcher did not reload the good bundle")
        assert s.service.policies["xx-swap"].version == "2.0.0"
        with pytest.raises(PolicyError, match="cannot read"):
            s.service.reload_policies(tmp_path / "missing.json")


def _atomic(path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _failed(s) -> float:
    m = s.http.get("/metrics", headers=AUTH).text
    (line,) = _metric(m, 'aion_policy_reloads_total{result="failed"}')
    return float(line.split()[-1])


def _wait(cond, msg: str, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, msg
        time.sleep(0.05)


def test_the_reload_route_is_refused_without_an_api_key(runs, tmp_path):
    path = _bundle(tmp_path, "[aeiouAEIOU]", "1.0.0")
    with serving(runs["sft"], policy=path, api_key_file=_keys(tmp_path)) as s:
        assert s.http.post("/admin/reload").status_code == 401
        assert s.http.post("/admin/reload", headers={"authorization": "Bearer nope"}).status_code == 401
        r = s.http.post("/admin/reload", headers=AUTH, json={"path": "/etc/passwd"})
        assert r.status_code == 400 and "takes no body" in r.json()["error"]["message"]
        assert s.http.post("/admin/reload", headers=AUTH).json()["changed"] is False
    with serving(runs["sft"], policy=path) as s:  # no API keys at all: fail closed
        r = s.http.post("/admin/reload")
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_requires_api_key"
    with serving(runs["sft"], policy=path, allow_unauthenticated_admin=True) as s:
        assert s.http.post("/admin/reload").status_code == 200
    with serving(runs["sft"], allow_unauthenticated_admin=True) as s:
        r = s.http.post("/admin/reload")
        assert r.status_code == 409 and r.json()["error"]["code"] == "no_policy_bundle"
