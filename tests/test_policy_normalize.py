"""Policy matching on the normalised view (NFKC, default-ignorables removed, case folding per
rule), redactions mapped back to the original characters, and streaming that stays exact."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aion_train.policy import Policy, PolicyError, default_policy, enforce, validate_policy_doc
from aion_train.policy.normalize import default_ignorable, normalize_text, normalized_view
from aion_train.serve.policy_runtime import StreamEnforcer, rule_actions

ZWSP, SHY, ZWJ = "\u200b", "\u00ad", "\u200d"


def pol(rules, **kw) -> Policy:
    doc = default_policy()
    doc.update(jurisdiction="xx-norm", version="1.0.0", rules=list(rules), **kw)
    return Policy.from_document(doc)


def test_view_is_nfkc_without_ignorables_and_casefolded_on_request():
    assert normalize_text("Ｓｅｃｒｅｔ") == "Secret"
    assert normalize_text("Ｓｅｃｒｅｔ", casefold=True) == "secret"
    assert normalize_text(f"se{ZWSP}cr{SHY}et{ZWJ}") == "secret"
    assert normalize_text("ﬁle") == "file"
    assert normalize_text("Stra\u00dfe", casefold=True) == "strasse"
    # a letter and its combining mark compose, also with an ignorable between them
    assert normalize_text(f"Ba{ZWSP}\u0308r") == "Bär" == unicodedata.normalize("NFC", "Bär")
    assert normalize_text("\u1100\u1161\u11a8") == "\uac01"  # Hangul jamo compose
    for cp in (0x200B, 0x00AD, 0x2060, 0xFEFF, 0xFE0F, 0x202E, 0xE0041):
        assert default_ignorable(cp), hex(cp)
    for cp in (0x20, 0x0600, 0xFFF9, ord("a"), 0x0301):
        assert not default_ignorable(cp), hex(cp)


def test_ignorable_table_agrees_with_the_unicode_property():
    regex = pytest.importorskip("regex")
    prop = regex.compile(r"\p{Default_Ignorable_Code_Point}")
    cps = [*range(0x0, 0x3000), *range(0xFE00, 0x10000), *range(0x1BC00, 0x1D200), *range(0xE0000, 0xE1000)]
    # the Unicode versions of `regex` and `unicodedata` may differ on new code points
    assigned = [cp for cp in cps if unicodedata.category(chr(cp)) != "Cn" and not 0xD800 <= cp < 0xE000]
    diff = [hex(cp) for cp in assigned if default_ignorable(cp) != bool(prop.match(chr(cp)))]
    assert diff == []


def test_view_maps_matches_back_to_the_original_characters():
    text = f"x {ZWSP}s{ZWSP}e{SHY}cret{ZWSP} y"
    v = normalized_view(text)
    assert v.data == b"x secret y"
    s = v.data.index(b"secret")
    os_, oe = v.orig_span(s, s + 6)
    assert text[os_:oe] == f"s{ZWSP}e{SHY}cret"  # inner ignorables in, outer ones out
    lig = normalized_view("a ﬁle")
    assert lig.data == b"a file"
    assert lig.orig_span(2, 3) == (2, 3)  # half of the ligature takes the whole ligature


EVASIVE = pol(
    [
        {"id": "t", "action": "redact", "terms": ["secret", "Bär"], "replacement": "#"},
        {"id": "p", "action": "redact", "patterns": ["pass[0-9]{2}"], "replacement": "%"},
        {"id": "pc", "action": "redact", "patterns": ["token"], "casefold": True, "replacement": "&"},
    ]
)


@pytest.mark.parametrize(
    "text, out",
    [
        ("a ｓｅｃｒｅｔ b", "a # b"),  # fullwidth letters
        (f"a se{ZWSP}cret b", "a # b"),  # zero-width space inside: removed with the term
        (f"a {ZWSP}secret{SHY} b", f"a {ZWSP}#{SHY} b"),  # ignorables just outside stay
        (f"a SE{SHY}CRET b", "a # b"),  # terms ignore case (as before) and soft hyphens
        ("Ba\u0308r!", "#!"),  # decomposed umlaut
        ("ｐａｓｓ４２ PASS42", "% PASS42"),  # patterns: NFKC, case-sensitive by default
        ("TOKEN ｔｏｋｅｎ To\u200bKen", "& & &"),  # casefold: true on a pattern
        ("secrets", "secrets"),  # still whole words only
    ],
)
def test_redaction_matches_the_normalised_view_and_removes_the_original(text, out):
    assert enforce(text, EVASIVE).text == out


def test_block_and_flag_rules_match_the_normalised_view():
    p = pol(
        [
            {"id": "b", "action": "block", "terms": ["bomb"]},
            {"id": "f", "action": "flag", "patterns": ["risk"], "casefold": True},
        ]
    )
    r = enforce(f"a ｂo{ZWSP}mb here", p)
    assert r.blocked and r.blocked_by == "b"
    r = enforce(f"RI{SHY}SK and ｒｉｓｋ", p)
    assert not r.blocked and [(f.rule_id, f.matches) for f in r.flags] == [("f", 2)]


def test_terms_casefold_false_is_case_sensitive_and_the_field_is_validated():
    p = pol([{"id": "t", "action": "redact", "terms": ["Secret"], "casefold": False}])
    assert enforce("Secret secret ＳＥＣＲＥＴ Ｓｅｃｒｅｔ", p).text == "[REDACTED] secret ＳＥＣＲＥＴ [REDACTED]"
    doc = default_policy()
    doc.update(jurisdiction="xx", rules=[{"id": "t", "action": "flag", "terms": ["a"], "casefold": "yes"}])
    with pytest.raises(PolicyError) as e:
        validate_policy_doc(doc, "p.json")
    assert [(i.path, i.message) for i in e.value.issues] == [("$.rules[0].casefold", "expected boolean, got str 'yes'")]
    doc["rules"] = [{"id": "t", "action": "flag", "terms": ["ok", f"{ZWSP}{SHY}"]}]
    with pytest.raises(PolicyError, match="empty once normalised"):
        validate_policy_doc(doc, "p.json")


def test_rule_spans_are_original_characters_or_utf8_bytes():
    rule = EVASIVE.rules[0]
    text = f"é ｓｅｃｒｅｔ se{ZWSP}cret"
    chars = list(rule.spans(text))
    assert [text[s:e] for s, e in chars] == ["ｓｅｃｒｅｔ", f"se{ZWSP}cret"]
    data = text.encode("utf-8")
    assert [data[s:e].decode("utf-8") for s, e in rule.spans(data)] == ["ｓｅｃｒｅｔ", f"se{ZWSP}cret"]
    assert rule.matches(data) and rule.matches(text) and not rule.matches("secrets")


def test_rule_actions_count_matches_on_the_normalised_view():
    text = f"ｓｅｃｒｅｔ, se{ZWSP}cret and pass12"
    res = enforce(text, EVASIVE)
    assert rule_actions(EVASIVE, text, res) == {
        "t": {"action": "redact", "matches": 2},
        "p": {"action": "redact", "matches": 1},
    }


# ------------------------------------------------------------------------ streaming
POLICIES = {
    "evasive": EVASIVE,
    "vowels-cf": pol([{"id": "v", "action": "redact", "patterns": ["[aeiou]"], "casefold": True, "replacement": "*"}]),
    "accent": pol([{"id": "e", "action": "redact", "patterns": ["é"], "replacement": "E"}]),
    "ligature": pol([{"id": "fi", "action": "redact", "patterns": ["fi"], "replacement": "_"}]),
    "sharp-s": pol([{"id": "ss", "action": "redact", "terms": ["strasse"], "replacement": "~"}]),
    "flag": pol([{"id": "f", "action": "flag", "terms": ["secret"]}]),
    "block": pol([{"id": "b", "action": "block", "terms": ["secret"]}]),
    "unbounded": pol([{"id": "n", "action": "redact", "patterns": ["[0-9]+"]}]),
    "chain": pol(
        [
            {"id": "a", "action": "redact", "patterns": ["a"], "replacement": "ｂ\u200bb"},
            {"id": "bbb", "action": "redact", "patterns": ["bbb"], "casefold": True, "replacement": "X"},
            {"id": "t", "action": "redact", "terms": ["Bär", "secret"], "replacement": "<t>"},
        ],
        max_output_chars=60,
        required_notices=["AI."],
    ),
}
PIECES = [
    "a", "b", "e", "x", " ", "\n", ".", "A", "B",
    "\u0301", "\u0308", "\u0300", "\u0301\u0301\u0301", "\u0323",  # combining marks (0323 reorders)
    "\u3349", "\ufb03",  # compatibility forms whose view is several characters
    "ｓ", "ｅ", "Ｅ", "ａ", "ﬁ", "ß", "S",  # fullwidth, ligature, sharp s
    ZWSP, SHY, ZWJ, "\ufeff",  # ignorables
    "secret", "ｓｅｃｒｅｔ", f"se{ZWSP}cret", f"SE{SHY}CRET", "Ba\u0308r", "Bär", "pass42", "ｐａｓｓ４２",
    "token", "TOKEN", "e\u0301", "é", "fi", "strasse", "Straße", "12", "漢", "🙂",
]  # fmt: skip


def stream_through(policy: Policy, text: str, cuts: list[int]) -> str:
    se = StreamEnforcer(policy)
    final = enforce(text, policy).text
    deltas = []
    for c in sorted(set(cuts)):
        deltas.append(se.feed(text[:c]))
        assert final.startswith(se.emitted)  # never shows what enforce changes
    tail, res = se.finish(text)
    assert res.text == final
    return "".join(deltas) + tail


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(POLICIES)),
    pieces=st.lists(st.sampled_from(PIECES), max_size=30),
    cuts=st.lists(st.integers(0, 200), max_size=15),
)
def test_stream_equals_non_streamed_on_random_normalisation_texts(name, pieces, cuts):
    text = "".join(pieces)
    assert (
        stream_through(POLICIES[name], text, [c for c in cuts if c <= len(text)]) == enforce(text, POLICIES[name]).text
    )


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize(
    "text",
    [
        f"xx se{ZWSP}cret yy and ｓｅｃｒｅｔ zz",
        "Ba\u0308r, e\u0301 and ﬁ: Straße TOKEN pass42 ｐａｓｓ４２ aaa",
        f"e{ZWSP}\u0301{SHY}\u0300 ab{ZWSP}{ZWSP}bb secret",
        "e\u0301\u0301\u0301\u0301\u0323 e\u0301\u0301\u0301 \ufb03 \u3349 é",  # a mark that reorders
    ],
)
def test_matches_straddling_every_chunk_boundary(name, text):
    p = POLICIES[name]
    for c in range(len(text) + 1):  # two chunks, split at every position
        assert stream_through(p, text, [c]) == enforce(text, p).text
    assert stream_through(p, text, list(range(len(text) + 1))) == enforce(text, p).text  # one char a chunk


def test_window_streams_progressively_on_non_ascii_text():
    p = POLICIES["evasive"]
    text = "Ｈｅｌｌｏ, a ｓｅｃｒｅｔ é and ﬁne words go by. " * 4
    se = StreamEnforcer(p)
    assert se.mode == "window"
    shown = [se.feed(text[:c]) for c in range(1, len(text))]
    assert sum(map(len, shown)) > len(text) // 2  # not held to the end
    assert "ｓｅｃｒｅｔ" not in "".join(shown)
    assert StreamEnforcer(POLICIES["block"]).mode == StreamEnforcer(POLICIES["unbounded"]).mode == "hold"


# ------------------------------------------------------------------------ bundle
def test_bundle_records_which_jurisdictions_hold_the_whole_output(tmp_path):
    import json
    from pathlib import Path

    from aion_train.policy import PolicySet, build_bundle, bundle_hash

    examples = Path(__file__).resolve().parents[1] / "configs" / "policies"
    streamable = tmp_path / "xx.json"
    streamable.write_text(
        json.dumps({"jurisdiction": "xx", "version": "1.0.0", "rules": EVASIVE.document["rules"]}), encoding="utf-8"
    )
    bundle = build_bundle([*sorted(examples.glob("*.json")), streamable])
    holds = {j: e["holds_whole_output"] for j, e in bundle["jurisdictions"].items()}
    # eu-de has a block rule, eu an e-mail pattern of unbounded width; xx is all bounded
    assert holds == {"default": False, "eu": True, "eu-de": True, "xx": False}
    ps = PolicySet(bundle)
    assert {j: ps[j].holds_whole_output for j in ps.jurisdictions} == holds
    assert {j: StreamEnforcer(ps[j]).mode == "hold" for j in ps.jurisdictions if j != "default"} == {
        "eu": True,
        "eu-de": True,
        "xx": False,
    }

    lied = json.loads(json.dumps(bundle))
    lied["jurisdictions"]["eu-de"]["holds_whole_output"] = False
    with pytest.raises(PolicyError, match=r"holds_whole_output.*says False"):
        PolicySet(lied)
    dropped = json.loads(json.dumps(bundle))
    del dropped["jurisdictions"]["eu"]["holds_whole_output"]
    with pytest.raises(PolicyError, match="missing"):
        PolicySet(dropped)
    # a bundle from before the field (none has it, hashed without it) still loads
    legacy = json.loads(json.dumps(bundle))
    for e in legacy["jurisdictions"].values():
        del e["holds_whole_output"]
    with pytest.raises(PolicyError, match="bundle hash mismatch"):
        PolicySet(legacy)  # the field is covered by the bundle hash
    legacy["bundle_sha256"] = bundle_hash({j: e["sha256"] for j, e in legacy["jurisdictions"].items()})
    assert PolicySet(legacy).bundle_sha256 == legacy["bundle_sha256"] != bundle["bundle_sha256"]
