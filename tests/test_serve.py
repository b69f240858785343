"""End-to-end tests of `aion-train serve` / `generate` / `audit verify` on tiny *trained*
checkpoints: a real `aion-train pretrain` run (completions) and a real `aion-train sft` run
(LoRA adapters merged, the post-training chat template), both made once per session in
~15 s each. The server runs in-process (uvicorn on a free loopback port, in a thread) and is
talked to with the official `openai` client and with raw HTTP where the bytes on the wire
matter (streamed events, error bodies)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from serve_fixtures import CHAT, REPO, VOWEL, _env, cli, free_port, serving, sse_events, stream_text  # noqa: E402

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------- the openai client
def test_openai_client_gets_completions_and_chat_streamed_and_not(runs):
    with serving(runs["sft"]) as s:
        models = s.client.models.list()
        assert [m.id for m in models.data] == [s.model]
        card = models.data[0].model_extra["aion"]
        assert card["kind"] == "sft" and card["chat_template"] is True and card["jurisdictions"] == ["default"]

        chat = s.client.chat.completions.create(model=s.model, messages=CHAT, max_tokens=24, seed=3)
        text = chat.choices[0].message.content
        assert isinstance(text, str) and chat.choices[0].finish_reason in ("stop", "length")
        assert chat.usage.completion_tokens >= 1 and chat.object == "chat.completion"
        aion = chat.model_extra["aion"]
        assert aion["jurisdiction"] == "default" and aion["blocked"] is False and aion["seed"] == 3
        assert aion["redactions"] == 0 and aion["flags"] == [] and len(aion["policy_sha256"]) == 64

        chunks = list(
            s.client.chat.completions.create(
                model=s.model, messages=CHAT, max_tokens=24, seed=3, stream=True, stream_options={"include_usage": True}
            )
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
            chat.choices[0].finish_reason
        ]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
        assert chunks[-1].model_extra["aion"]["policy_sha256"] == aion["policy_sha256"]

        comp = s.client.completions.create(model=s.model, prompt="scene: a blue", max_tokens=16, seed=5)
        ctext = comp.choices[0].text
        streamed = "".join(
            c.choices[0].text
            for c in s.client.completions.create(
                model=s.model, prompt="scene: a blue", max_tokens=16, seed=5, stream=True
            )
            if c.choices
        )
        assert streamed == ctext and comp.object == "text_completion"
        echo = s.client.completions.create(model=s.model, prompt="scene: a blue", max_tokens=16, seed=5, echo=True)
        assert echo.choices[0].text == "scene: a blue" + ctext
        assert (
            "".join(
                c.choices[0].text
                for c in s.client.completions.create(
                    model=s.model, prompt="scene: a blue", max_tokens=16, seed=5, echo=True, stream=True
                )
                if c.choices
            )
            == echo.choices[0].text
        )

        # sampling: same seed same output; n choices; greedy; stop strings cut the text
        again = s.client.chat.completions.create(model=s.model, messages=CHAT, max_tokens=24, seed=3)
        assert again.choices[0].message.content == text
        many = s.client.chat.completions.create(
            model=s.model, messages=CHAT, max_tokens=12, n=3, seed=1, temperature=1.5
        )
        assert [c.index for c in many.choices] == [0, 1, 2]
        assert len({c.message.content for c in many.choices}) > 1
        greedy = [
            s.client.completions.create(model=s.model, prompt="scene: a", max_tokens=10, temperature=0, seed=k)
            .choices[0]
            .text
            for k in range(2)
        ]
        assert greedy[0] == greedy[1]
        g = greedy[0]
        if len(g.strip()) > 2:
            stop = g.strip()[1:3]
            cut = s.client.completions.create(
                model=s.model, prompt="scene: a", max_tokens=10, temperature=0, stop=[stop]
            )
            assert cut.choices[0].text == g[: g.index(stop)] and cut.choices[0].finish_reason == "stop"

        # logprobs + echo: the log-likelihood of a given continuation
        lp = s.client.completions.create(
            model=s.model, prompt="scene: a red circle", max_tokens=0, echo=True, logprobs=1, temperature=0
        )
        c = lp.choices[0]
        assert c.text == "scene: a red circle"
        assert c.logprobs.token_logprobs[0] is None and all(x <= 0 for x in c.logprobs.token_logprobs[1:])
        assert len(c.logprobs.tokens) == len(c.logprobs.text_offset) == lp.usage.prompt_tokens
        gen = s.client.completions.create(model=s.model, prompt="scene: a", max_tokens=5, logprobs=2, temperature=0)
        gl = gen.choices[0].logprobs
        assert all(max(t.values()) == pytest.approx(v) for t, v in zip(gl.top_logprobs, gl.token_logprobs))


def test_pretrain_checkpoint_serves_completions_equal_to_generate(runs):
    with serving(runs["pt"]) as s:
        assert s.client.models.list().data[0].model_extra["aion"]["kind"] == "pretrain"
        r = s.client.completions.create(
            model=s.model,
            prompt="The history of",
            max_tokens=20,
            seed=9,
            temperature=0.8,
            top_p=0.9,
            extra_body={"top_k": 40},
        )
        with pytest.raises(openai.BadRequestError) as e:
            s.client.chat.completions.create(model=s.model, messages=CHAT)
        assert e.value.body["code"] == "chat_template_unavailable"
    out = cli(
        "generate",
        "--checkpoint",
        str(runs["pt"]),
        "The history of",
        "--max-tokens",
        "20",
        "--seed",
        "9",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--top-k",
        "40",
        "--json",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    g = json.loads(out.stdout.strip().splitlines()[-1])
    assert g["text"] == r.choices[0].text and len(g["token_ids"]) == r.usage.completion_tokens
    # greedy through generate equals the project's KV-cached model.generate, token for token
    out = cli(
        "generate",
        "--checkpoint",
        str(runs["pt"]),
        "The history of",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--json",
    )
    g = json.loads(out.stdout.strip().splitlines()[-1])
    import torch

    from aion_train.model import generate
    from aion_train.serve.loading import load_for_serving
    from aion_train.serve.text import Detokenizer

    lm = load_for_serving(str(runs["pt"]))
    ids = lm.encode_prompt("The history of")
    ref = generate(lm.model, torch.tensor([ids]), 12, eos_id=lm.eos_ids[0])[0, len(ids) :].tolist()
    ref = ref[: ref.index(lm.eos_ids[0])] if lm.eos_ids[0] in ref else ref
    assert g["token_ids"] == ref and g["text"] == Detokenizer(lm.tokenizer, ids).text(ref)


def test_served_completions_with_an_index_equal_generate_with_it(runs, tmp_path):
    pytest.importorskip("faiss")
    pytest.importorskip("bm25s")
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in {
        "loops": "A for loop iterates over the items of a sequence in order.",
        "tea": "Green tea is steeped at a lower temperature than black tea.",
        "moons": "Jupiter has many moons; Ganymede is the largest of them.",
    }.items():
        (docs / f"{name}.txt").write_text(text)
    idx = tmp_path / "idx"
    out = cli(
        "build-index",
        "--corpus",
        str(docs / "*.txt"),
        "--out",
        str(idx),
        "--embedder",
        "hash-256",
        "--factory",
        "Flat",
        "--no-cache",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    prompt = "How does a for loop iterate?"
    with serving(runs["pt"], index=idx, k=2) as s:
        r = s.client.completions.create(model=s.model, prompt=prompt, max_tokens=8, temperature=0)
        streamed = s.http.post(
            "/v1/completions",
            json={"model": s.model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True},
        )
        # per request: k and MMR; all three documents come back
        three = s.client.completions.create(
            model=s.model,
            prompt=prompt,
            max_tokens=2,
            temperature=0,
            extra_body={"retrieval": {"k": 3, "mmr_lambda": 1.0}},
        )
        # a context budget that leaves room for the question and a few tokens of context only:
        # the chunks are cut, the question is kept whole, and the block fits
        ctx_len = s.http.get("/v1/models").json()["data"][0]["aion"]["max_seq_len"]
        q_tokens = len(
            s.http.post(
                "/v1/completions",
                json={"model": s.model, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0},
            ).json()["choices"][0]["logprobs"]["tokens"]
        )
        tight = s.client.completions.create(
            model=s.model, prompt=prompt, max_tokens=ctx_len - q_tokens - 12, temperature=0, echo=True,
            extra_body={"retrieval": {"k": 3}},
        )  # fmt: skip
        bad = s.http.post("/v1/completions", json={"model": s.model, "prompt": prompt, "retrieval": {"k": 0}})
    assert bad.status_code == 400
    assert len(three.model_extra["aion"]["retrieval"]["hits"][0]) == 3
    cut_hits = tight.model_extra["aion"]["retrieval"]["hits"][0]
    assert cut_hits and any("cut_to_chars" in h for h in cut_hits)
    assert tight.choices[0].text.startswith("<CTX> ") and (" </CTX> " + prompt) in tight.choices[0].text
    hits = r.model_extra["aion"]["retrieval"]["hits"]
    assert len(hits) == 1 and hits[0] and hits[0][0]["source"].endswith("loops.txt")
    events = sse_events(streamed)
    assert events[-1]["aion"]["retrieval"]["hits"] == hits
    assert "".join(c["text"] for e in events for c in e["choices"]) == r.choices[0].text
    g = cli(
        "generate",
        "--checkpoint",
        str(runs["pt"]),
        prompt,
        "--index",
        str(idx),
        "--k",
        "2",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--json",
    )
    assert g.returncode == 0, g.stderr[-2000:]
    g = json.loads(g.stdout.strip().splitlines()[-1])
    assert g["text"] == r.choices[0].text and g["aion"]["retrieval"]["hits"] == hits[0]
    # chat: the context goes into the last user message, as generate --chat puts it
    with serving(runs["sft"], index=idx, k=1) as s:
        c = s.client.chat.completions.create(model=s.model, messages=CHAT, max_tokens=6, temperature=0)
    chat_hits = c.model_extra["aion"]["retrieval"]["hits"]
    g = cli(
        "generate",
        "--checkpoint",
        str(runs["sft"]),
        CHAT[1]["content"],
        "--chat",
        "--system",
        CHAT[0]["content"],
        "--index",
        str(idx),
        "--k",
        "1",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--json",
    )
    assert g.returncode == 0, g.stderr[-2000:]
    g = json.loads(g.stdout.strip().splitlines()[-1])
    assert len(chat_hits) == 1 and g["aion"]["retrieval"]["hits"] == chat_hits[0]
    assert g["text"] == c.choices[0].message.content


# ---------------------------------------------------------------------------- jurisdictions
def test_unknown_jurisdiction_is_refused_naming_the_known_ones(runs, bundle):
    with serving(runs["sft"], policy=bundle) as s:
        for kw in (
            {"extra_body": {"jurisdiction": "xx-nope"}},
            {"extra_headers": {"X-Jurisdiction": "EU"}},
            {"extra_body": {"jurisdiction": ""}},
        ):
            with pytest.raises(openai.BadRequestError) as e:
                s.client.chat.completions.create(model=s.model, messages=CHAT, max_tokens=4, **kw)
            err = e.value.body
            assert e.value.status_code == 400 and err["code"] == "unknown_jurisdiction"
            assert err["param"] == "jurisdiction" and err["type"] == "invalid_request_error"
            assert "default, eu, eu-de, xx-block, xx-digits, xx-novowel" in err["message"]
        with pytest.raises(openai.BadRequestError) as e:
            s.client.completions.create(
                model=s.model,
                prompt="x",
                max_tokens=2,
                extra_body={"jurisdiction": "eu"},
                extra_headers={"X-Jurisdiction": "eu-de"},
            )
        assert e.value.body["code"] == "conflicting_jurisdiction"
        # the header alone selects the policy
        r = s.client.completions.create(
            model=s.model, prompt="scene: a", max_tokens=8, seed=1, extra_headers={"X-Jurisdiction": "xx-novowel"}
        )
        assert r.model_extra["aion"]["jurisdiction"] == "xx-novowel"
        assert not VOWEL.search(r.choices[0].text)


def _raw_chat(s, jurisdiction, seed, stream, max_tokens=40):
    body = {
        "model": s.model,
        "messages": CHAT,
        "max_tokens": max_tokens,
        "seed": seed,
        "temperature": 1.0,
        "stream": stream,
        **({"jurisdiction": jurisdiction} if jurisdiction else {}),
    }
    if not stream:
        r = s.http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()
    with s.http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        return sse_events(r)


def _raw_completion(s, jurisdiction, seed, stream, max_tokens=40):
    body = {
        "model": s.model,
        "prompt": "scene: a green triangle. is there",
        "max_tokens": max_tokens,
        "seed": seed,
        "stream": stream,
        **({"jurisdiction": jurisdiction} if jurisdiction else {}),
    }
    if not stream:
        r = s.http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()
    with s.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        return sse_events(r)


def test_vowel_policy_streams_without_leaking_and_default_equals_generate(runs, bundle):
    progressive = 0
    with serving(runs["sft"], policy=bundle) as s:
        for seed in range(4):
            raw = _raw_chat(s, None, seed, False)["choices"][0]["message"]["content"]
            body = _raw_chat(s, "xx-novowel", seed, False)
            enforced = body["choices"][0]["message"]["content"]
            assert enforced == VOWEL.sub("*", raw)  # on real model output
            assert body["aion"]["redactions"] == len(VOWEL.findall(raw))
            events = _raw_chat(s, "xx-novowel", seed, True)
            pieces = stream_text(events, key="content").get(0, [])
            assert "".join(pieces) == enforced  # byte for byte
            assert not any(VOWEL.search(p) for p in pieces)  # no vowel reaches the client
            progressive += len(pieces) > 1
            # completions too, and the other policy kinds (held back / blocked)
            for j in ("xx-novowel", "xx-digits", "xx-block", "eu-de", None):
                full = _raw_completion(s, j, seed, False)
                ev = _raw_completion(s, j, seed, True)
                assert "".join(stream_text(ev).get(0, [])) == full["choices"][0]["text"], j
                assert ev[-1]["aion"] == {**full["aion"], "request_id": ev[-1]["aion"]["request_id"]}
                finish = [c["finish_reason"] for e in ev for c in e["choices"] if c["finish_reason"]]
                assert finish == [full["choices"][0]["finish_reason"]]
            blocked = _raw_completion(s, "xx-block", seed, False)
            assert blocked["choices"][0]["finish_reason"] == "content_filter" and blocked["aion"]["blocked"]
            assert blocked["choices"][0]["text"] == "[This response was withheld under the xx-block content policy.]"
            assert _raw_completion(s, "xx-digits", seed, False)["choices"][0]["text"].endswith("\n\nAI generated.")
        assert VOWEL.search(raw)  # the test had vowels to redact
    assert progressive >= 1  # it streams, not only at the end
    # the default policy returns the raw model text, equal to `aion-train generate` (same seed)
    prompt = CHAT[1]["content"]
    with serving(runs["sft"], policy=bundle) as s:
        raw = s.client.chat.completions.create(model=s.model, messages=[CHAT[1]], max_tokens=30, seed=11)
        vow = s.client.chat.completions.create(
            model=s.model, messages=[CHAT[1]], max_tokens=30, seed=11, extra_body={"jurisdiction": "xx-novowel"}
        )
    out = cli(
        "generate", "--checkpoint", str(runs["sft"]), "--chat", prompt, "--seed", "11", "--max-tokens", "30", "--json"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    g = json.loads(out.stdout.strip().splitlines()[-1])
    assert g["text"] == raw.choices[0].message.content and len(g["token_ids"]) == raw.usage.completion_tokens
    assert g["aion"]["jurisdiction"] == "default" and g["aion"]["seed"] == 11
    out = cli(
        "generate",
        "--checkpoint",
        str(runs["sft"]),
        "--chat",
        prompt,
        "--seed",
        "11",
        "--max-tokens",
        "30",
        "--policy",
        str(bundle),
        "--jurisdiction",
        "xx-novowel",
        "--json",
    )
    g2 = json.loads(out.stdout.strip().splitlines()[-1])
    assert g2["text"] == vow.choices[0].message.content == VOWEL.sub("*", g["text"])
    assert g2["token_ids"] == g["token_ids"]  # the model's tokens do not change
    bad = cli("generate", "--checkpoint", str(runs["sft"]), "x", "--policy", str(bundle), "--jurisdiction", "zz")
    assert bad.returncode == 2 and "known jurisdictions: default, eu" in bad.stderr


# ---------------------------------------------------------------------------- errors
def test_errors_are_json_in_openais_shape(runs):
    with serving(runs["sft"], max_body_bytes=4096) as s:

        def err(resp, status, code=None, param=None):
            assert resp.status_code == status, resp.text
            e = resp.json()["error"]
            assert set(e) == {"message", "type", "param", "code"} and e["message"]
            if code:
                assert e["code"] == code
            if param:
                assert e["param"] == param
            return e

        post = s.http.post
        err(
            post("/v1/completions", content=b'{"model": "x", "prompt": ', headers={"content-type": "application/json"}),
            400,
            "invalid_json",
        )
        err(post("/v1/completions", content=b"[1, 2]"), 400, "invalid_json")
        e = err(
            post("/v1/completions", json={"model": s.model, "prompt": "hi", "max_tokns": 3}),
            400,
            "unknown_parameter",
            "max_tokns",
        )
        assert "max_tokns" in e["message"]
        err(
            post("/v1/chat/completions", json={"model": s.model, "messages": CHAT, "colour": 1}),
            400,
            "unknown_parameter",
            "colour",
        )
        err(post("/v1/completions", json={"model": s.model}), 400, "missing_required_parameter", "prompt")
        err(
            post("/v1/completions", json={"model": s.model, "prompt": "hi", "temperature": 5}),
            400,
            "invalid_value",
            "temperature",
        )
        ctx = s.service.loaded.max_seq_len
        e = err(
            post("/v1/completions", json={"model": s.model, "prompt": list(range(4, 4 + ctx + 1))}),
            400,
            "context_length_exceeded",
            "prompt",
        )
        assert str(ctx) in e["message"]
        err(
            post("/v1/completions", json={"model": s.model, "prompt": "hi", "max_tokens": ctx}),
            400,
            "context_length_exceeded",
            "max_tokens",
        )
        err(post("/v1/completions", json={"model": s.model, "prompt": "x" * 5000}), 413, "request_too_large")
        e = err(post("/v1/completions", json={"model": "gpt-4", "prompt": "hi"}), 404, "model_not_found", "model")
        assert s.model in e["message"]
        err(s.http.get("/v1/models/gpt-4"), 404, "model_not_found")
        err(s.http.get("/v1/nothing"), 404)
        err(
            post(
                "/v1/chat/completions",
                json={
                    "model": s.model,
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                },
            ),
            400,
            "media_unsupported",  # a text-only model
        )
        with pytest.raises(openai.NotFoundError):
            s.client.completions.create(model="nope", prompt="x")
        with pytest.raises(openai.BadRequestError):
            s.client.completions.create(model=s.model, prompt="x", extra_body={"bogus": True})


def test_logprobs_are_refused_under_a_policy_that_changes_text(runs, bundle):
    with serving(runs["sft"], policy=bundle) as s:
        r = s.http.post(
            "/v1/completions",
            json={"model": s.model, "prompt": "a", "max_tokens": 3, "logprobs": 1, "jurisdiction": "xx-novowel"},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "logprobs_unavailable_under_policy"


# ---------------------------------------------------------------------------- metrics, health, keys
def test_a_dead_engine_process_fails_health_and_requests_with_503(runs):
    """On the CPU the engine runs in its own process; killed, the server says so (health 503
    for a probe to restart it) and every request gets a clean 503 in OpenAI's error shape."""
    import os
    import signal

    with serving(runs["pt"]) as s:
        assert s.service.engine_mode == "process"
        r = s.client.completions.create(model=s.model, prompt="The for statement", max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason == "length"
        proc = s.service.scheduler._proc
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        deadline = time.time() + 30
        while s.service.engine_down() is None and time.time() < deadline:
            time.sleep(0.05)
        h = s.http.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "engine_down"
        assert "engine process is gone" in h.json()["error"]
        with pytest.raises(openai.InternalServerError) as e:
            s.client.completions.create(model=s.model, prompt="The for statement", max_tokens=4)
        assert e.value.status_code == 503
        assert e.value.body["code"] == "engine_down" and "engine is not running" in e.value.body["message"]


def test_health_metrics_and_api_keys(runs, bundle, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# one key a line\nsecret-key-1\n")
    with serving(runs["sft"], policy=bundle, api_key_file=str(keys)) as s:
        assert s.http.get("/health").json() == {"status": "ok", "model": s.model}
        with pytest.raises(openai.AuthenticationError):
            s.client.models.list()
        assert s.http.get("/metrics").status_code == 401
        ok = openai.OpenAI(
            base_url=s.url + "/v1",
            api_key="secret-key-1",
            max_retries=0,
            http_client=openai.DefaultHttpxClient(trust_env=False),
        )
        r = ok.completions.create(
            model=s.model, prompt="scene: a", max_tokens=12, seed=2, extra_body={"jurisdiction": "xx-novowel"}
        )
        ok.chat.completions.create(model=s.model, messages=CHAT, max_tokens=6, seed=2)
        m = s.http.get("/metrics", headers={"authorization": "Bearer secret-key-1"}).text
        assert 'aion_requests_total{endpoint="completions",jurisdiction="xx-novowel",status="200"} 1.0' in m
        assert 'aion_requests_total{endpoint="chat",jurisdiction="default",status="200"} 1.0' in m
        assert "aion_request_latency_seconds_bucket" in m and "aion_completion_tokens_total" in m
        n = r.model_extra["aion"]["redactions"]
        if n:
            assert (
                f'aion_policy_actions_total{{action="redact",jurisdiction="xx-novowel",rule="vowels"}} {float(n)}' in m
            )
        # streamed: time to first byte of text, per policy (xx-block holds the whole output)
        list(ok.completions.create(model=s.model, prompt="scene: a", max_tokens=12, seed=2, stream=True,
                                   extra_body={"jurisdiction": "xx-block"}))  # fmt: skip
        list(ok.chat.completions.create(model=s.model, messages=CHAT, max_tokens=12, seed=2, stream=True,
                                        extra_body={"jurisdiction": "xx-novowel"}))  # fmt: skip
        m = s.http.get("/metrics", headers={"authorization": "Bearer secret-key-1"}).text
        for e, j in (("completions", "xx-block"), ("chat", "xx-novowel")):
            assert f'aion_time_to_first_byte_seconds_count{{endpoint="{e}",jurisdiction="{j}"}} 1.0' in m


# ---------------------------------------------------------------------------- audit
def test_audit_log_of_a_run_verifies_and_an_edit_is_caught(runs, bundle, tmp_path):
    log = tmp_path / "audit" / "audit.jsonl"
    with serving(runs["sft"], policy=bundle, audit_log=log) as s:
        _raw_chat(s, "xx-novowel", 1, True, max_tokens=12)
        _raw_chat(s, None, 1, False, max_tokens=12)
        _raw_completion(s, "xx-block", 1, False, max_tokens=6)
        s.http.post("/v1/completions", json={"model": s.model, "prompt": "x", "jurisdiction": "xx-nope"})
    lines = log.read_text().splitlines()
    recs = [json.loads(ln) for ln in lines]
    assert len(recs) == 4
    assert [r["status"] for r in recs] == [200, 200, 200, 400]
    assert recs[0]["jurisdiction"] == "xx-novowel" and recs[0]["stream"] is True
    assert recs[3]["error"] == "unknown_jurisdiction" and recs[3]["known_jurisdiction"] is False
    if recs[2]["blocked"]:
        assert recs[2]["actions"] == {"lower": {"action": "block", "matches": 1}}
    for r in recs:
        assert {
            "time",
            "request_id",
            "policy_sha256",
            "prompt_tokens",
            "completion_tokens",
            "prev_sha256",
            "sha256",
            "actions",
        } <= set(r)
        assert not {"prompt", "messages", "text", "content"} & set(r)
    text = log.read_text()
    assert CHAT[1]["content"] not in text
    ok = cli("audit", "verify", str(log))
    assert ok.returncode == 0 and "ok: 4 records" in ok.stdout, ok.stderr
    edited = lines.copy()
    edited[1] = edited[1].replace('"completion_tokens":', '"completion_tokens":1', 1)
    bad = tmp_path / "edited.jsonl"
    bad.write_text("\n".join(edited) + "\n")
    r = cli("audit", "verify", str(bad))
    assert r.returncode == 1 and "line 2:" in r.stderr, r.stderr
    assert json.loads(cli("audit", "verify", str(bad), "--json").stdout)["bad_line"] == 2


# ---------------------------------------------------------------------------- concurrency
def test_concurrent_requests_are_batched_and_each_equals_its_solo_run(runs):
    prompts = ["scene: a red", "scene: a blue square. is there a", "is", "scene: a green circle"]
    with serving(runs["sft"], max_batch=4) as s:
        steps0 = s.service.scheduler.steps
        solo = [
            s.client.completions.create(model=s.model, prompt=p, max_tokens=24, temperature=0).choices[0].text
            for p in prompts
        ]
        solo_steps = s.service.scheduler.steps - steps0  # the decode steps of the four, one after the other
        results: dict[int, str] = {}
        start = threading.Barrier(2 * len(prompts))

        def one(i):
            start.wait(30)
            results[i] = (
                s.client.completions.create(model=s.model, prompt=prompts[i], max_tokens=24, temperature=0)
                .choices[0]
                .text
            )

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts)) for _ in range(2)]
        steps1 = s.service.scheduler.steps
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [results[i] for i in range(len(prompts))] == solo
        # each prompt twice: alone they would take 2 * solo_steps; rows that joined a running
        # batch (continuous batching) shared its decode steps
        assert s.service.scheduler.steps - steps1 < 2 * solo_steps


# ---------------------------------------------------------------------------- the command itself
def test_serve_command_binds_loopback_logs_json_and_stops_cleanly(runs, bundle, tmp_path):
    import signal

    port = free_port()
    log = tmp_path / "audit.jsonl"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aion_train.cli",
            "serve",
            "--checkpoint",
            str(runs["sft"]),
            "--policy",
            str(bundle),
            "--port",
            str(port),
            "--audit-log",
            str(log),
            "--json-logs",
        ],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, trust_env=False)
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "serve did not come up"
            time.sleep(0.2)
        card = http.get("/v1/models").json()["data"][0]
        model = card["id"]
        r = http.post(
            "/v1/completions",
            json={"model": model, "prompt": "scene: a", "max_tokens": 8, "seed": 4, "jurisdiction": "xx-novowel"},
        )
        assert r.status_code == 200 and not VOWEL.search(r.json()["choices"][0]["text"])
        # a client that goes away mid-stream stops its generation
        room = (
            card["aion"]["max_seq_len"]
            - http.post("/v1/chat/completions", json={"model": model, "messages": CHAT, "max_tokens": 1}).json()[
                "usage"
            ]["prompt_tokens"]
        )
        with http.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": model, "messages": CHAT, "stream": True, "max_tokens": room, "seed": 1, "temperature": 2.0},
        ) as resp:
            for line in resp.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break  # the first generated text: generation is running
        # and so does a client of a non-streamed request that gives up waiting (it is audited too)
        with pytest.raises(httpx.ReadTimeout):
            http.post(
                "/v1/chat/completions",
                json={"model": model, "messages": CHAT, "max_tokens": room, "n": 4, "seed": 1, "temperature": 2.0},
                timeout=httpx.Timeout(60, read=0.05),
            )
        deadline = time.time() + 30
        while len(log.read_text().splitlines()) < 4 and time.time() < deadline:
            time.sleep(0.1)
        http.close()
    finally:
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    lines = [json.loads(ln) for ln in err.splitlines() if ln.startswith("{")]
    assert any(
        ln.get("logger") == "aion_train.serve.access"
        and ln.get("path") == "/v1/completions"
        and ln.get("status") == 200
        and ln.get("request_id")
        for ln in lines
    )
    assert any(f"127.0.0.1:{port}" in ln.get("message", "") for ln in lines)
    recs = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert [r["status"] for r in recs] == [200, 200, 499, 499]
    # stopped early: fewer tokens than asked for (sampling at T=2 ends only at room), 1 and 4 choices
    for r, n in zip(recs[2:], (1, 4)):
        assert r["error"] == "client_disconnected" and 0 < r["completion_tokens"] < n * room, r
    assert cli("audit", "verify", str(log)).returncode == 0
