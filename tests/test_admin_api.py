"""The admin dashboard's JSON API and pages over real HTTP against the real server (issue 16):
no session -> 401 and nothing changes, no CSRF -> 403, hostile input bounded, escaping,
dashboard bundle == build-policy bundle, publish -> live redaction -> rollback."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from serve_fixtures import EXAMPLE_POLICIES, cli, serving

pytest.importorskip("jinja2")
pytestmark = pytest.mark.slow  # real servers on loopback (and the trained tiny checkpoints)

TOKEN = "test-admin-token-0123456789abcdef"
VOWELS_RULE = {"id": "vowels", "action": "redact", "patterns": ["[aeiou]"], "replacement": "*"}


def eu_de_doc() -> dict:
    return json.loads(next(p for p in EXAMPLE_POLICIES if p.name == "eu-de.json").read_text())


@pytest.fixture
def admin_bundle(tmp_path):
    r = cli("build-policy", *map(str, EXAMPLE_POLICIES), "--out", str(tmp_path / "bundle"))
    assert r.returncode == 0, r.stderr
    tok = tmp_path / "admin_tokens"
    tok.write_text(f"# admins\nalice {TOKEN}\n")
    return tmp_path / "bundle", tok


@pytest.fixture
def live(runs, admin_bundle, tmp_path):
    bundle_dir, tok = admin_bundle
    with serving(
        runs["sft"], policy=bundle_dir / "policy_bundle.json", audit_log=tmp_path / "audit.jsonl", admin_token_file=tok
    ) as s:
        yield s, bundle_dir


def login(http: httpx.Client) -> str:
    r = http.post("/admin/login", json={"token": TOKEN})
    assert r.status_code == 200, r.text
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "max-age" in cookie
    assert TOKEN not in r.text
    return r.json()["csrf_token"]


def chat(s, j: str) -> dict:
    r = s.http.post(
        "/v1/chat/completions",
        json={
            "model": s.model,
            "messages": [{"role": "user", "content": "is there a red circle?"}],
            "max_tokens": 24,
            "temperature": 0,
            "jurisdiction": j,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_admin_end_to_end(live, tmp_path):
    s, bundle_dir = live
    bundle_file = bundle_dir / "policy_bundle.json"
    before = bundle_file.read_bytes()
    anon = httpx.Client(base_url=s.url, timeout=60, trust_env=False)
    doc = eu_de_doc()
    # --- no session: 401 everywhere, nothing changes
    gets = [
        "/admin/",
        "/admin/policies/eu-de",
        "/admin/audit",
        "/admin/api/jurisdictions",
        "/admin/api/policies/eu-de",
        "/admin/api/policies/eu-de/diff?a=1.1.0&b=1.1.0",
        "/admin/api/audit",
    ]
    for path in gets:
        assert anon.get(path).status_code == 401, path
    posts = {
        "/admin/api/validate": {"policy": doc},
        "/admin/api/try": {"jurisdiction": "eu-de", "text": "x"},
        "/admin/api/policies/eu-de": {"policy": {**doc, "version": "9.0.0"}},
        "/admin/api/policies/eu-de/rollback": {"version": "1.1.0"},
        "/admin/api/reload": {},
        "/admin/logout": {},
    }
    for path, body in posts.items():
        assert anon.post(path, json=body).status_code == 401, path
    assert bundle_file.read_bytes() == before
    assert anon.post("/admin/login", json={"token": "wrong-token-wrong-token"}).status_code == 401

    csrf = login(s.http)
    # --- session but no CSRF: 403 on publish, nothing changes
    r = s.http.post("/admin/api/policies/eu-de", json={"policy": {**doc, "version": "9.0.0"}})
    assert r.status_code == 403 and bundle_file.read_bytes() == before
    r = s.http.post(
        "/admin/api/policies/eu-de", json={"policy": {**doc, "version": "9.0.0"}}, headers={"X-CSRF-Token": "wrong"}
    )
    assert r.status_code == 403 and bundle_file.read_bytes() == before
    h = {"X-CSRF-Token": csrf}

    # --- jurisdictions: tree, default unrestricted
    js = s.http.get("/admin/api/jurisdictions").json()
    by = {x["jurisdiction"]: x for x in js["jurisdictions"]}
    assert by["default"]["unrestricted"] and by["eu-de"]["parent"] == "eu" and "eu-de" in js["tree"]["children"]["eu"]
    pv = s.http.get("/admin/api/policies/eu-de").json()
    marks = {r_["id"]: r_["inherited"] for r_ in pv["resolved"]["rules"]}
    assert marks["eu-email"] is True and marks["de-phone"] is False
    assert pv["own"] == doc and pv["history"][0]["action"] == "import"

    # --- validation: every error with its path; hostile input fast
    bad = {**doc, "rules": doc["rules"] + [{"id": "x", "action": "redact", "patterns": ["(a)\\1"]}], "bogus": 1}
    v = s.http.post("/admin/api/validate", json={"policy": bad, "jurisdiction": "eu-de"}, headers=h).json()
    paths = {e["path"] for e in v["errors"]}
    assert not v["ok"] and "$.bogus" in paths
    v = s.http.post(
        "/admin/api/validate", json={"policy": {**doc, "rules": bad["rules"]}, "jurisdiction": "eu-de"}, headers=h
    ).json()
    assert [e["path"] for e in v["errors"]] == ["$.rules[2].patterns[0]"], v
    for hostile in (
        {"text": "x" * (50 << 20)},
        {"policy": {**doc, "rules": [{"id": "n", "action": "flag", "patterns": ["(a+)+$"]}]}},
        {"text": "[" * 100_000},
    ):
        t0 = time.monotonic()
        r = s.http.post("/admin/api/validate", json=hostile, headers=h)
        assert time.monotonic() - t0 < 1.0 and (r.status_code == 413 or not r.json()["ok"]), r.text[:300]

    # --- try: text with spans and the rule that fired
    t = s.http.post("/admin/api/try", json={"jurisdiction": "eu-de", "text": "mail a@b.de now"}, headers=h).json()
    assert "[email removed]" in t["enforced"] and t["spans"][0]["rule"] == "eu-email"
    t = s.http.post("/admin/api/try", json={"jurisdiction": "eu-de", "prompt": "hello", "max_tokens": 8}, headers=h)
    assert t.status_code == 200 and "raw" in t.json()

    # --- publish -> live redaction with the new sha -> rollback -> gone
    old_sha = chat(s, "eu-de")["aion"]["policy_sha256"]
    new_doc = {**doc, "version": "1.2.0", "rules": doc["rules"] + [VOWELS_RULE]}
    r = s.http.post("/admin/api/policies/eu-de", json={"policy": new_doc}, headers=h)
    assert r.status_code == 200, r.text
    pub = r.json()["published"]
    assert r.json()["reload"]["bundle_sha256"] == pub["bundle_sha256"] == s.service.policies.bundle_sha256
    a = chat(s, "eu-de")["aion"]
    assert a["policy_sha256"] == pub["policy_sha256"] != old_sha
    assert a["redactions"] > 0
    # same JSON through build-policy: same bundle sha256
    src = tmp_path / "src"
    src.mkdir()
    for p in EXAMPLE_POLICIES:
        (src / p.name).write_text(p.read_text())
    (src / "eu-de.json").write_text(json.dumps(new_doc))
    rb = cli("build-policy", str(src), "--out", str(tmp_path / "cli_bundle"))
    assert rb.returncode == 0, rb.stderr
    assert json.loads(rb.stdout)["bundle_sha256"] == pub["bundle_sha256"]
    # version must go up
    assert s.http.post("/admin/api/policies/eu-de", json={"policy": new_doc}, headers=h).status_code == 409
    r = s.http.post("/admin/api/policies/eu-de/rollback", json={"version": "1.1.0"}, headers=h)
    assert r.status_code == 200, r.text
    rolled = r.json()["published"]
    assert rolled["version"] == "1.2.1" and rolled["rollback_of"] == "1.1.0"
    a = chat(s, "eu-de")["aion"]
    assert a["policy_sha256"] == rolled["policy_sha256"] and a["redactions"] == 0
    diff = s.http.get("/admin/api/policies/eu-de/diff?a=1.1.0&b=1.2.0").json()["diff"]
    assert '"vowels"' in diff
    assert len(list((bundle_dir / "admin" / "bundles").glob("*.json"))) == 3  # imported + 2 published, all kept

    # --- a bundle built on the command line shows up
    cli_doc = {**doc, "version": "2.0.0"}
    (src / "eu-de.json").write_text(json.dumps(cli_doc))
    rb = cli("build-policy", str(src), "--out", str(bundle_dir), "--overwrite")
    assert rb.returncode == 0, rb.stderr
    pv = s.http.get("/admin/api/policies/eu-de").json()
    assert pv["version"] == "2.0.0" and pv["history"][0]["action"] == "import" and pv["own"] == cli_doc

    # --- audit: admin actions with who, requests, chain verified, filters
    au = s.http.get("/admin/api/audit").json()
    assert au["verify"]["ok"]
    acts = [(x.get("admin_action"), x.get("who")) for x in au["records"] if x.get("endpoint") == "admin"]
    for act in ("login", "publish", "rollback", "reload", "login_failed"):
        assert any(a_ == act for a_, _ in acts), act
    assert ("publish", "alice") in acts
    au = s.http.get("/admin/api/audit", params={"jurisdiction": "eu-de", "rule": "vowels"}).json()
    assert au["records"] and all("vowels" in x["actions"] for x in au["records"])
    # metrics of the last hour
    js = s.http.get("/admin/api/jurisdictions").json()
    eude = next(x for x in js["jurisdictions"] if x["jurisdiction"] == "eu-de")
    assert eude["last_hour"]["requests"] >= 3 and eude["last_hour"]["actions"].get("vowels", 0) > 0
    # serving API keys are not needed and pages render
    page = s.http.get("/admin/policies/eu-de")
    assert page.status_code == 200 and "content-security-policy" in page.headers and "<script>" not in page.text


def test_pages_escape_hostile_text(live):
    s, _ = live
    csrf = login(s.http)
    doc = eu_de_doc()
    evil = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    hostile = {**doc, "version": "1.3.0", "description": evil, "required_notices": [evil + " notice"]}
    r = s.http.post("/admin/api/policies/eu-de", json={"policy": hostile}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200, r.text
    page = s.http.get("/admin/policies/eu-de").text
    assert evil not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # a hostile jurisdiction name in the URL is escaped too
    r = s.http.get("/admin/policies/%3Cscript%3Ex")
    assert r.status_code == 404 and "<script>x" not in r.text and "&lt;script&gt;x" in r.text
    assert s.http.get("/admin/").status_code == 200 and evil not in s.http.get("/admin/").text


def test_admin_refused_without_token(runs, admin_bundle, tmp_path):
    from aion_train.admin import AdminSite

    site = AdminSite(admin_bundle[0], [])
    import threading

    import uvicorn
    from serve_fixtures import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(site.app(), host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False) as c:
            assert c.post("/admin/login", json={"token": ""}).status_code == 403
            assert c.post("/admin/login", json={"token": TOKEN}).status_code == 403
            assert c.get("/admin/api/jurisdictions").status_code == 401
    finally:
        server.should_exit = True
        th.join(10)


def test_api_keys_do_not_open_the_admin(runs, admin_bundle, tmp_path):
    bundle_dir, tok = admin_bundle
    keys = tmp_path / "keys"
    keys.write_text("serving-key-0123456789\n")
    with serving(
        runs["sft"], policy=bundle_dir / "policy_bundle.json", api_key_file=str(keys), admin_token_file=tok
    ) as s:
        bearer = {"Authorization": "Bearer serving-key-0123456789"}
        assert s.http.get("/admin/api/jurisdictions", headers=bearer).status_code == 401
        assert s.http.post("/admin/login", json={"token": "serving-key-0123456789"}).status_code == 401
        assert s.http.get("/v1/models").status_code == 401  # the serving API still needs its key
        login(s.http)  # no API key needed for the admin side
        assert s.http.get("/admin/api/jurisdictions").status_code == 200


def test_sessions_expire_and_failed_logins_slow_down():
    from aion_train.admin.auth import Auth

    now = [1000.0]
    a = Auth([("alice", TOKEN)], ttl=60, clock=lambda: now[0])
    s = a.new_session("alice", "127.0.0.1")
    assert a.session(s.sid) is s and a.check_token(TOKEN) == "alice" and a.check_token(TOKEN[:-1]) is None
    now[0] += 61
    assert a.session(s.sid) is None
    delays = []
    for _ in range(5):
        delays.append(a.failure_delay("1.2.3.4"))
        a.record_failure("1.2.3.4")
    assert delays[0] == 0 and delays == sorted(delays) and delays[-1] > delays[1]
    assert Auth([]).check_token("") is None and not Auth([]).enabled


def test_standalone_admin_command(admin_bundle, tmp_path):
    """`aion-train admin --bundle DIR` on its own: publish rewrites the bundle file (what a
    server's file watcher picks up), admin actions go to the audit log."""
    import os
    import subprocess
    import sys

    from serve_fixtures import REPO, _env, free_port

    bundle_dir, tok = admin_bundle
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aion_train.cli",
            "admin",
            "--bundle",
            str(bundle_dir),
            "--admin-token-file",
            str(tok),
            "--port",
            str(port),
        ],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, trust_env=False) as c:
            deadline = time.time() + 60
            while True:
                try:
                    if c.get("/admin/login").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "slow"
                time.sleep(0.2)
            assert c.get("/admin/api/jurisdictions").status_code == 401
            csrf = login(c)
            doc = {**eu_de_doc(), "version": "1.5.0"}
            r = c.post("/admin/api/policies/eu-de", json={"policy": doc}, headers={"X-CSRF-Token": csrf})
            assert r.status_code == 200 and "reload" not in r.json(), r.text  # no serving process here
            on_disk = json.loads((bundle_dir / "policy_bundle.json").read_text())
            assert on_disk["jurisdictions"]["eu-de"]["policy"]["version"] == "1.5.0"
            t = c.post("/admin/api/try", json={"jurisdiction": "eu-de", "prompt": "hi"}, headers={"X-CSRF-Token": csrf})
            assert t.status_code == 409
            au = c.get("/admin/api/audit").json()
            assert au["verify"]["ok"] and [x["admin_action"] for x in au["records"]][:2] == ["publish", "login"]
    finally:
        proc.terminate()
        proc.wait(30)
    assert os.path.exists(bundle_dir / "admin" / "audit.jsonl")
    # no token: refuses to start
    env = _env()
    env.pop("AION_ADMIN_TOKEN", None)
    env.pop("AION_ADMIN_TOKEN_FILE", None)
    r = subprocess.run(
        [sys.executable, "-m", "aion_train.cli", "admin", "--bundle", str(bundle_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "no admin token" in r.stderr
