"""Per-jurisdiction output policies (aion_train.policy, `aion-train build-policy`).

Policies are versioned artifacts applied to a model's outputs; they never touch the weights.
Every hostile-input check must answer within a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from aion_train.ownership import MARKER
from aion_train.policy import (
    BUNDLE_FILE,
    DEFAULT_POLICY,
    MAX_JSON_DEPTH,
    MAX_POLICY_BYTES,
    ModerationUnavailable,
    Policy,
    PolicyError,
    PolicySet,
    UnknownJurisdiction,
    build_bundle,
    compile_pattern,
    enforce,
    generate_with_policy,
    json_depth,
    load_policy_file,
    write_bundle,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "configs" / "policies"
EXAMPLE_FILES = [EXAMPLES / "default.json", EXAMPLES / "eu.json", EXAMPLES / "eu-de.json"]


def write(path: Path, doc) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def policy(j="xx", version="1.0.0", **fields) -> dict:
    return {"jurisdiction": j, "version": version, **fields}


def compiled(**fields) -> Policy:
    return Policy.from_document(policy(**fields))


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def rejected(path: Path) -> tuple[PolicyError, float]:
    with Timer() as t:
        with pytest.raises(PolicyError) as info:
            load_policy_file(path)
    return info.value, t.seconds


# --------------------------------------------------------------------------- validation
def test_unknown_field_is_rejected_with_its_json_path(tmp_path):
    f = write(
        tmp_path / "br.json",
        policy(
            "br",
            rules=[
                {"id": "ok", "action": "flag", "terms": ["x"]},
                {"id": "r1", "action": "redact", "patterns": ["abc"], "replacment": "typo"},
            ],
        ),
    )
    err, seconds = rejected(f)
    assert seconds < 1.0
    assert str(err).startswith(f"{f}: $.rules[1].replacment: unknown field 'replacment'")
    top = write(tmp_path / "top.json", policy("br", colour="red"))
    assert f"{top}: $.colour: unknown field 'colour'" in str(rejected(top)[0])
    mod = write(tmp_path / "mod.json", policy("br", output_moderation={"enabled": True, "treshold": 0.5}))
    assert "$.output_moderation.treshold: unknown field" in str(rejected(mod)[0])


@pytest.mark.parametrize(
    "doc, where, words",
    [
        (policy("EU"), "$.jurisdiction", "jurisdiction id"),
        (policy("eu", "1.0"), "$.version", "semantic version"),
        ({"version": "1.0.0"}, "$", "missing required field 'jurisdiction'"),
        (policy(rules=[{"id": "a", "action": "delete", "terms": ["x"]}]), "$.rules[0].action", "not one of"),
        (policy(rules=[{"id": "a", "action": "flag"}]), "$.rules[0]", "exactly one of"),
        (
            policy(rules=[{"id": "a", "action": "flag", "terms": ["x"], "patterns": ["x"]}]),
            "$.rules[0]",
            "exactly one of",
        ),
        (
            policy(rules=[{"id": "a", "action": "block", "terms": ["x"], "replacement": "y"}]),
            "$.rules[0].replacement",
            "only allowed",
        ),
        (
            policy(
                rules=[{"id": "a", "action": "flag", "terms": ["x"]}, {"id": "a", "action": "flag", "terms": ["y"]}]
            ),
            "$.rules[1].id",
            "duplicate rule id",
        ),
        (policy(max_output_chars=0), "$.max_output_chars", ""),
        (policy(output_moderation={"threshold": 2}), "$.output_moderation.threshold", "maximum"),
        (
            policy("default", rules=[{"id": "a", "action": "flag", "terms": ["x"]}]),
            "$.rules",
            "default policy must have no rules",
        ),
    ],
)
def test_schema_and_rule_errors_name_file_and_path(tmp_path, doc, where, words):
    f = write(tmp_path / "p.json", doc)
    err, seconds = rejected(f)
    assert seconds < 1.0
    assert any(i.file == str(f) and i.path == where and words in i.message for i in err.issues), str(err)


@pytest.mark.parametrize(
    "pattern, words",
    [
        ("(a+)+", "nested quantifier"),
        ("(a*)*", "nested quantifier"),
        ("(a|aa)+", "ambiguous alternation"),
        (r"(\d|\w)+x", "ambiguous alternation"),
        (r"(?:\w+\s)+", "nested quantifier"),
        ("(x{1,50})+", "nested quantifier"),
        ("(a?)*b", "nested quantifier"),
        ("a*", "empty string"),
        (r"(a)\1", "backreferences"),
        ("foo(?=bar)", "lookarounds"),
    ],
)
def test_catastrophic_and_non_re2_patterns_are_rejected_with_path(tmp_path, pattern, words):
    f = write(
        tmp_path / "br.json",
        policy(
            "br",
            rules=[
                {"id": "a", "action": "flag", "terms": ["fine"]},
                {"id": "b", "action": "flag", "patterns": ["ok"]},
                {"id": "c", "action": "redact", "patterns": ["[0-9]{3}", pattern]},
            ],
        ),
    )
    err, seconds = rejected(f)
    assert seconds < 1.0
    assert str(err).startswith(f"{f}: $.rules[2].patterns[1]: ")
    assert words in str(err)


def test_patterns_too_large_to_compile_are_rejected_quickly(tmp_path):
    f = write(
        tmp_path / "big.json",
        policy(rules=[{"id": f"r{i}", "action": "flag", "patterns": [r"\pL{1000}"] * 100} for i in range(50)]),
    )
    err, seconds = rejected(f)
    assert seconds < 2.0
    assert str(err.issues[0]).startswith(f"{f}: $.rules[0].patterns[0]: not a valid RE2 pattern: pattern too large")
    assert "compile to more than" in err.issues[-1].message  # budget stops the work


@pytest.mark.parametrize(
    "pattern",
    [
        r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,24}",
        r"(\d+\.){3}\d+",
        "(ab|ac)+",
        "(?i)(foo|bar)+",
        r"\pL+\s\d{3}",
        r"(?:[ab]|c)+x",
        r"\x{1F600}+",
        r"\b[A-Z]{2}[0-9]{2}(?:[ ]?[A-Z0-9]{4}){2,7}\b",
    ],
)
def test_ordinary_patterns_are_accepted(pattern):
    compile_pattern(pattern)


def test_50_mb_file_is_rejected_after_a_stat(tmp_path):
    f = tmp_path / "huge.json"
    with open(f, "wb") as fh:  # sparse: no 50 MB actually written
        fh.truncate(50 * 1024 * 1024)
    err, seconds = rejected(f)
    assert seconds < 1.0
    assert str(err) == (f"{f}: $: file is {50 * 1024 * 1024} bytes, over the {MAX_POLICY_BYTES}-byte limit")


@pytest.mark.parametrize(
    "make",
    [
        lambda n: "[" * n + "]" * n,  # 100k nested lists
        lambda n: "[" * n,  # ... never closed
        lambda n: '{"jurisdiction": ' + '{"a": ' * n + "1" + "}" * n + "}",
    ],
)
def test_deep_nesting_is_rejected_without_recursion(tmp_path, make):
    f = write(tmp_path / "deep.json", make(100_000))
    err, seconds = rejected(f)  # a RecursionError would fail the test
    assert seconds < 1.0
    assert str(err) == f"{f}: $: JSON nested more than {MAX_JSON_DEPTH} levels deep"


def test_depth_scan_skips_strings_and_is_fast_on_hostile_bytes(tmp_path):
    assert json_depth(b'{"a": "[[[[{{{{", "b": [[1], "]]\\"[["]}') == 3
    # 1 MB of escaped quotes would make a naive string regex quadratic
    with Timer() as t:
        assert json_depth(b'"' + b'\\"' * 500_000) == 0
        assert json_depth(b"[" + b'"x",' * 250_000 + b'""]') == 1
    assert t.seconds < 1.0
    f = write(tmp_path / "q.json", '{"jurisdiction": "' + '\\"' * 400_000)
    err, seconds = rejected(f)
    assert seconds < 1.0 and str(err).startswith(f"{f}: $: invalid JSON")


def test_duplicate_keys_and_nan_are_rejected(tmp_path):
    f = write(tmp_path / "d.json", '{"jurisdiction": "eu", "version": "1.0.0", "jurisdiction": "us"}')
    assert "duplicate key 'jurisdiction'" in str(rejected(f)[0])
    g = write(
        tmp_path / "n.json", '{"jurisdiction": "eu", "version": "1.0.0", "output_moderation": {"threshold": NaN}}'
    )
    assert "NaN is not allowed" in str(rejected(g)[0])


# ---------------------------------------------------------------------------- inheritance
def test_inheritance_child_overrides_scalars_and_appends_rules(tmp_path):
    parent = write(
        tmp_path / "eu.json",
        policy(
            "eu",
            "1.0.0",
            max_output_chars=100,
            required_notices=["AI generated."],
            output_moderation={"enabled": False, "categories": ["violence"], "threshold": 0.8},
            rules=[
                {"id": "p1", "action": "flag", "terms": ["alpha"]},
                {"id": "p2", "action": "redact", "patterns": ["[0-9]{4}"]},
            ],
        ),
    )
    child = write(
        tmp_path / "eu-de.json",
        policy(
            "eu-de",
            "2.1.0",
            parent="eu",
            max_output_chars=50,
            required_notices=["KI-generiert."],
            output_moderation={"threshold": 0.5},
            rules=[{"id": "c1", "action": "block", "terms": ["omega"]}],
        ),
    )
    bundle = build_bundle([child, parent])
    de = bundle["jurisdictions"]["eu-de"]["policy"]
    assert [r["id"] for r in de["rules"]] == ["p1", "p2", "c1"]
    assert de["version"] == "2.1.0" and de["max_output_chars"] == 50
    assert de["required_notices"] == ["AI generated.", "KI-generiert."]
    assert de["output_moderation"] == {"enabled": False, "categories": ["violence"], "threshold": 0.5}
    assert "parent" not in de
    assert [e["jurisdiction"] for e in bundle["jurisdictions"]["eu-de"]["lineage"]] == ["eu", "eu-de"]
    eu = bundle["jurisdictions"]["eu"]["policy"]
    assert eu["max_output_chars"] == 100 and [r["id"] for r in eu["rules"]] == ["p1", "p2"]
    assert set(bundle["jurisdictions"]) == {"default", "eu", "eu-de"}  # built-in default

    # a child reusing a parent's rule id is refused (rules are appended, not replaced)
    dup = write(
        tmp_path / "eu-fr.json", policy("eu-fr", parent="eu", rules=[{"id": "p1", "action": "block", "terms": ["x"]}])
    )
    with pytest.raises(PolicyError) as info:
        build_bundle([parent, dup])
    assert f"{dup}: $.rules[0].id: rule id 'p1' is already defined by eu ({parent})" in str(info.value)


def test_inheritance_cycles_and_missing_parents_are_errors(tmp_path):
    a = write(tmp_path / "a.json", policy("aa", parent="bb"))
    b = write(tmp_path / "b.json", policy("bb", parent="aa"))
    c = write(tmp_path / "c.json", policy("cc", parent="aa"))
    with pytest.raises(PolicyError) as info:
        build_bundle([a, b, c])
    msg = str(info.value)
    assert f"{a}: $.parent: inheritance cycle: aa ({a}) -> bb ({b}) -> aa ({a})" in msg
    assert f"{b}: $.parent: inheritance cycle" in msg
    assert f"{c}: $.parent:" in msg

    self_loop = write(tmp_path / "s.json", policy("ss", parent="ss"))
    with pytest.raises(PolicyError, match="inheritance cycle: ss"):
        build_bundle([self_loop])

    orphan = write(tmp_path / "o.json", policy("br-sp", parent="br"))
    with pytest.raises(PolicyError) as info:
        build_bundle([orphan])
    assert str(info.value) == (f"{orphan}: $.parent: parent jurisdiction 'br' is not defined by any of the input files")

    twin = write(tmp_path / "twin.json", policy("aa"))
    with pytest.raises(PolicyError, match="also defined by"):
        build_bundle([write(tmp_path / "a2.json", policy("aa")), twin])


# ---------------------------------------------------------------------------- enforcement
def test_block_redact_flag_truncate_and_notices():
    pol = compiled(
        j="zz",
        rules=[
            {"id": "no-bombs", "action": "block", "category": "weapons", "terms": ["pipe bomb"]},
            {
                "id": "email",
                "action": "redact",
                "category": "pii",
                "patterns": [r"[a-z]+@[a-z]+\.com"],
                "replacement": "<email>",
            },
            {"id": "ssn", "action": "redact", "patterns": [r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b"]},
            {"id": "advice", "action": "flag", "category": "regulated", "terms": ["legal advice"]},
        ],
        max_output_chars=40,
        required_notices=["AI generated.", "Second notice."],
    )

    r = enforce("Ask bob@mail.com or ann@x.com, SSN 123-45-6789.", pol)
    assert r.text == "Ask <email> or <email>, SSN [REDACTED].\n\nAI generated.\n\nSecond notice."
    assert (r.blocked, r.redactions, r.flags, r.truncated) == (False, 3, [], False)
    assert r.policy_hash == pol.sha256 and r.jurisdiction == "zz"

    r = enforce("How to build a PIPE  Bomb at home", pol)  # case, inner whitespace
    assert r.blocked and r.blocked_by == "no-bombs"
    assert r.text == ("[This response was withheld under the zz content policy.]\n\nAI generated.\n\nSecond notice.")
    assert r.redactions == 0

    r = enforce("Not legal advice. Legal Advice again; legal advices no.", pol)
    assert not r.blocked and [(f.rule_id, f.category, f.matches) for f in r.flags] == [("advice", "regulated", 2)]
    text = "Not legal advice. Legal Advice again; legal advices no."
    assert r.truncated and r.text.split("\n\n")[0] == text[:40]  # flag keeps the text

    # word boundaries: no match inside longer words, Unicode letters count as word chars
    words = compiled(rules=[{"id": "t", "action": "redact", "terms": ["café", "foo"]}])
    r = enforce("Foo foo-bar foobar xfoo CAFÉ cafés Café.", words)
    assert r.text == "[REDACTED] [REDACTED]-bar foobar xfoo [REDACTED] cafés [REDACTED]."
    assert r.redactions == 4

    # redaction happens before truncation, so a cut can never expose half a secret
    cut = compiled(
        rules=[{"id": "s", "action": "redact", "patterns": ["secret[0-9]+"], "replacement": "#"}], max_output_chars=5
    )
    assert enforce("ab secret12345", cut).text == "ab #"
    assert enforce("abcdefgh", cut).text == "abcde"


def test_output_moderation_uses_the_supplied_moderator():
    pol = compiled(output_moderation={"enabled": True, "categories": ["violence"], "threshold": 0.7})
    scores = {"violence": 0.9, "spam": 1.0}
    r = enforce("text", pol, moderator=lambda t: scores)
    assert r.blocked and r.blocked_by == "moderation:violence"
    r = enforce("text", pol, moderator=lambda t: {"violence": 0.69, "spam": 1.0})
    assert not r.blocked and r.text == "text"
    with pytest.raises(ModerationUnavailable):
        enforce("text", pol)  # fails closed


def test_default_policy_returns_outputs_unchanged():
    rng = random.Random(0)
    alphabet = "abcXYZ 019\n\t\r\x00\x7f[]{}()*+?.^$|\\éßÆ漢字🙂\u200b\u0301\ufeff\ud800\udfff"  # lone surrogates too
    ps = PolicySet.default_only()
    for _ in range(2000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        r = enforce(s, DEFAULT_POLICY)
        assert r.text == s and type(r.text) is str
        assert not r.blocked and r.flags == [] and r.redactions == 0
        assert ps["default"] is ps.default and ps.get(None) is ps.default
        assert ps.enforce(s, None).text == s
    bundle = build_bundle(EXAMPLE_FILES)
    ps = PolicySet(bundle)
    for _ in range(200):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        assert ps.enforce(s, "default").text == s
        assert ps.enforce(s, None).text == s  # no jurisdiction -> default


def test_unknown_jurisdiction_fails_closed_unless_a_fallback_is_declared(tmp_path):
    bundle = build_bundle(EXAMPLE_FILES)
    ps = PolicySet(bundle)
    assert ps.fallback_jurisdiction is None
    # misspelt, unknown, other case, empty: refused, naming the known ones; never the default
    for j in ["us-ca", "eu_de", "EU-DE", "", "anything"]:
        with pytest.raises(UnknownJurisdiction, match=r"unknown jurisdiction .*known: default, eu, eu-de"):
            ps[j]
        with pytest.raises(UnknownJurisdiction):
            ps.enforce("some text", j)
        with pytest.raises(UnknownJurisdiction):
            generate_with_policy(lambda p: pytest.fail("generated for an unknown jurisdiction"), "prompt", ps, j)
        assert j not in ps
    with pytest.raises(UnknownJurisdiction):
        PolicySet.default_only()["anything"]

    # an explicit fallback, covered by the bundle hash
    fb = build_bundle(EXAMPLE_FILES, fallback="eu")
    assert fb["fallback_jurisdiction"] == "eu" and fb["bundle_sha256"] != bundle["bundle_sha256"]
    assert build_bundle(EXAMPLE_FILES)["bundle_sha256"] == bundle["bundle_sha256"]
    path = write_bundle(fb, tmp_path / "fb")
    ps = PolicySet.load(path)
    assert ps.fallback_jurisdiction == "eu" and ps["us-ca"] is ps["eu"]
    assert ps.get(None) is ps.default
    with pytest.raises(PolicyError, match="fallback jurisdiction 'xx' is not defined"):
        build_bundle(EXAMPLE_FILES, fallback="xx")
    # switching a fallback on (or changing it) by editing the file breaks the bundle hash
    for edit in ({"fallback_jurisdiction": "default"}, {"fallback_jurisdiction": "eu-de"}):
        tampered = write(tmp_path / "t.json", json.dumps({**bundle, **edit}))
        with pytest.raises(PolicyError, match="bundle hash mismatch"):
            PolicySet.load(tampered)
    tampered = write(tmp_path / "t2.json", json.dumps({**bundle, "fallback_jurisdiction": "zz"}))
    with pytest.raises(PolicyError, match="fallback jurisdiction 'zz' is not one of"):
        PolicySet.load(tampered)


def test_example_policies_build_and_apply(tmp_path):
    bundle = build_bundle(EXAMPLE_FILES)
    assert set(bundle["jurisdictions"]) == {"default", "eu", "eu-de"}
    again = build_bundle(list(reversed(EXAMPLE_FILES)))
    assert again["bundle_sha256"] == bundle["bundle_sha256"]  # content-addressed
    path = write_bundle(bundle, tmp_path / "out")
    assert path == tmp_path / "out" / BUNDLE_FILE
    assert sorted(os.listdir(tmp_path / "out")) == [MARKER, BUNDLE_FILE]  # no temp file left; the ownership marker
    ps = PolicySet.load(path)
    assert ps.bundle_sha256 == bundle["bundle_sha256"]
    text = "Write to jo@example.org or +49 30 1234567. This is not legal advice."
    r = ps.enforce(text, "eu-de")
    assert r.text == (
        "Write to [email removed] or [Telefonnummer entfernt]. This is not "
        "legal advice.\n\nThis content was generated by an AI system.\n\n"
        "Dieser Inhalt wurde von einem KI-System erzeugt."
    )
    assert r.redactions == 2 and [f.rule_id for f in r.flags] == ["eu-regulated-advice"]
    assert ps.enforce("Kein verbotene  Kennzeichen bitte", "eu-de").blocked
    assert not ps.enforce("Kein verbotene  Kennzeichen bitte", "eu").blocked
    assert ps.enforce(text, "default").text == text

    # tampering with a policy inside the bundle is detected by its hash
    bundle["jurisdictions"]["eu"]["policy"]["rules"].pop()
    bad = write(tmp_path / "tampered.json", json.dumps(bundle))
    with pytest.raises(PolicyError, match=r"\$\.jurisdictions\.eu\.sha256: hash mismatch"):
        PolicySet.load(bad)


def test_reload_swaps_atomically_while_requests_run(tmp_path):
    def bundle_with(word):
        f = write(tmp_path / "eu.json", policy("eu", rules=[{"id": "w", "action": "redact", "terms": [word]}]))
        return build_bundle([f])

    out = tmp_path / "out"
    old = bundle_with("alpha")
    write_bundle(old, out)
    ps = PolicySet.load(out)
    old_hash = ps["eu"].sha256
    new = bundle_with("beta")
    new_hash = new["jurisdictions"]["eu"]["sha256"]
    expected = {old_hash: "[REDACTED] beta", new_hash: "alpha [REDACTED]"}

    seen, errors, stop = set(), [], threading.Event()

    def worker():
        while not stop.is_set():
            r = generate_with_policy(lambda p: p, "alpha beta", ps, "eu")
            if expected.get(r.policy_hash) != r.text:
                errors.append((r.policy_hash, r.text))
            seen.add(r.policy_hash)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    write_bundle(new, out)
    assert ps.reload() is True
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    assert not errors and new_hash in seen
    assert ps["eu"].sha256 == new_hash and ps.reload() is False

    # a broken bundle leaves the loaded policies in place
    (out / BUNDLE_FILE).write_text("{")
    with pytest.raises(PolicyError, match="invalid JSON"):
        ps.reload()
    assert ps["eu"].sha256 == new_hash


# ------------------------------------------------------------------ weights stay untouched
def _weights_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def one_torch_thread():
    """The tiny model is faster on one thread, and far faster on a busy shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _trained_checkpoint(tmp_path: Path):
    """(the trained model, its run folder): a tiny MoE trained 6 AdamW steps on pydoc text,
    saved as a pretraining run with its tokenizer (what `aion-train generate` loads)."""
    from pydoc_data.topics import topics

    from aion_train.checkpoint import save_sharded_checkpoint
    from aion_train.config import dump_yaml, load_config
    from aion_train.data import Tokenizer
    from aion_train.data.tokenizer import train_tokenizer
    from aion_train.model import build_model

    texts = list(topics.values())[:80]
    train_tokenizer(texts, str(tmp_path / "tok.model"), 400)
    tok = Tokenizer(str(tmp_path / "tok.model"))
    cfg = load_config(
        str(REPO / "configs" / "tiny_cpu.yaml"),
        [
            "model.vocab_size=400",
            "model.d_model=64",
            "model.n_layers=2",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "model.d_ff=128",
            "model.max_seq_len=96",
            "model.moe.n_experts=4",
            "model.moe.d_ff_expert=64",
            "model.kernels=torch",
            "data.seq_len=64",
        ],
    )
    model = build_model(cfg.model, seed=0).train()
    ids = torch.tensor([tok.encode(" ".join(texts))[: 4 * 65]]).view(4, 65)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # it did train
    run = tmp_path / "run"
    save_sharded_checkpoint(run, cfg.model, model.state_dict(), tp=1, ep=1)
    cfg.data.tokenizer = tok.path
    (run / "config.yaml").write_text(dump_yaml(cfg))
    return model.eval(), run


def test_policies_never_touch_the_weights(tmp_path, one_torch_thread):
    """The design's core rule, through the serving path `aion-train generate` / `serve` use
    (load_for_serving -> Service -> Engine, the policy enforced on the generated text):
    generating under policies, reloading them and generating again leaves the trained
    weights bit-identical and creates no gradients."""
    import re

    from aion_train.serve.loading import load_for_serving
    from aion_train.serve.sampling import SamplingParams
    from aion_train.serve.service import PromptSpec, Service

    trained, run = _trained_checkpoint(tmp_path)
    loaded = load_for_serving(str(run))
    before = _weights_sha256(loaded.model)
    assert before == _weights_sha256(trained)  # serving holds the trained weights

    def bundle_with(replacement):
        f = write(
            tmp_path / "zz.json",
            policy(
                "zz",
                rules=[{"id": "vowels", "action": "redact", "patterns": ["[aeiou]"], "replacement": replacement}],
                required_notices=["filtered"],
            ),
        )
        write_bundle(build_bundle(EXAMPLE_FILES + [f]), tmp_path / "out")

    bundle_with("*")
    service = Service(loaded, PolicySet.load(tmp_path / "out"), engine="thread")
    prompts = []
    for text in ("The for statement", "Names refer to objects"):
        ids = loaded.encode_prompt(text)
        prompts.append(PromptSpec(ids=ids, context=ids, text=text))
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    sampled = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=12, seed=5)

    def texts(jurisdiction, params, n=1):
        _, results, _ = service.generate(prompts, n, params, [12, 12], service.policy.resolve(jurisdiction))
        return [r.text for r in results], sum(r.enforcement.redactions for r in results)

    raw = [texts(None, p, n)[0] for p, n in ((greedy, 1), (sampled, 2))]
    assert all(re.search("[aeiou]", t) for t in raw[0] + raw[1])  # the rule has text to act on
    for params, n, want in ((greedy, 1, raw[0]), (sampled, 2, raw[1])):
        assert texts("default", params, n)[0] == want  # identity policy: exactly raw
        got, redactions = texts("zz", params, n)
        assert redactions > 0
        assert got == [re.sub("[aeiou]", "*", t) + "\n\nfiltered" for t in want]
        texts("eu-de", params, n)
    bundle_with("_")  # a new version, reloaded
    assert service.policies.reload() is True
    assert texts("zz", greedy)[0] == [re.sub("[aeiou]", "_", t) + "\n\nfiltered" for t in raw[0]]
    assert texts(None, greedy)[0] == raw[0] and texts(None, sampled, 2)[0] == raw[1]

    assert _weights_sha256(loaded.model) == before
    assert all(p.grad is None for p in loaded.model.parameters())


# ------------------------------------------------------------------------------------ CLI
def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "aion_train.cli", "build-policy", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_build_policy_good_and_bad_files(tmp_path):
    good = write(tmp_path / "eu.json", json.loads((EXAMPLES / "eu.json").read_text()))
    bad = write(
        tmp_path / "br.json",
        policy(
            "br",
            rules=[
                {"id": "a", "action": "flag", "terms": ["x"]},
                {"id": "b", "action": "redact", "patterns": ["(a|aa)+"]},
                {"id": "c", "action": "flag", "terms": ["y"], "colour": "red"},
            ],
        ),
    )
    proc = _cli("eu.json", "br.json", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert any(line.startswith("br.json: $.rules[1].patterns[0]: ambiguous alternation") for line in lines), proc.stderr
    assert "br.json: $.rules[2].colour: unknown field 'colour'" in proc.stderr
    assert "no bundle written" in proc.stderr and "eu.json" not in proc.stderr
    assert not (tmp_path / "out").exists()

    bad.unlink()
    proc = _cli("eu.json", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    bundle = json.loads((tmp_path / "out" / BUNDLE_FILE).read_text())
    assert summary["bundle_sha256"] == bundle["bundle_sha256"]
    assert set(bundle["jurisdictions"]) == {"default", "eu"}
    assert PolicySet.load(tmp_path / "out")["eu"].sha256 == summary["jurisdictions"]["eu"]["sha256"]
    assert summary["fallback_jurisdiction"] is None
    with pytest.raises(UnknownJurisdiction):
        PolicySet.load(tmp_path / "out")["us-ca"]
    assert good.exists()

    proc = _cli("eu.json", "--fallback", "eu", "--out", "fb", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ps = PolicySet.load(tmp_path / "fb")
    assert json.loads(proc.stdout)["fallback_jurisdiction"] == "eu" and ps["us-ca"] is ps["eu"]
    proc = _cli("eu.json", "--fallback", "eu-de", "--out", "fb2", cwd=tmp_path)
    assert proc.returncode == 2 and "fallback jurisdiction 'eu-de' is not defined" in proc.stderr
    assert not (tmp_path / "fb2").exists()


@pytest.mark.slow
def test_cli_logs_the_bundle_to_mlflow(tmp_path, monkeypatch):
    from aion_train.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    assert main(["build-policy", *map(str, EXAMPLE_FILES), "--out", "out", "--run-dir", str(run_dir)]) == 0
    info = json.loads((run_dir / "mlflow_run.json").read_text())
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=info["tracking_uri"])
    run = client.get_run(info["run_id"])
    bundle = json.loads((tmp_path / "out" / BUNDLE_FILE).read_text())
    assert run.info.status == "FINISHED"
    assert run.data.params["policy.bundle_sha256"] == bundle["bundle_sha256"]
    assert run.data.params["policy.eu-de.sha256"] == bundle["jurisdictions"]["eu-de"]["sha256"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "policy")] == ["policy/" + BUNDLE_FILE]
