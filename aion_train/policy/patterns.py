"""Compiling policy patterns with RE2 (linear-time), plus a static refusal of patterns that
would backtrack catastrophically in other engines.

RE2 itself refuses backreferences and lookarounds. On top of that, `check_pattern` walks the
pattern's parse tree (Python's `re._parser`, after translating RE2-only syntax such as
`\\pL`, `\\x{...}` and `[[:alpha:]]` into something it parses with the same structure) and
refuses, inside any unbounded repeat (`*`, `+`, `{n,}` or `{n,m}` with m > 10):

  * another unbounded repeat            `(a+)+`, `(a*)*`, `(?:\\w+\\s)+`
  * a body that can match the empty string  `(a?)*`, `(a|)+`
  * an alternation whose branches overlap   `(a|aa)+`, `(\\w|\\d)+`
    (two branches can match the same text, or one a prefix of the other; compared
    character by character, conservatively: `(ab|ac)+` passes, `(foo|foobar)+` does not)

and, anywhere, a pattern that can match the empty string (a redact rule would insert its
replacement between every two characters). RE2 stays linear on all of these; the platform
refuses them because policies get ported to backtracking engines.

Compile cost is bounded too: one pattern gets at most PATTERN_MAX_MEM of RE2 program
(`\\pL{1000}` is refused), and `loader.rule_issues` caps a policy's total program size.

Terms are literal strings: `compile_terms` builds one RE2 alternation (case-insensitive
unless the rule sets `casefold: false`) whose matches must not touch a letter, digit, mark
or `_` on either side (a Unicode-aware word boundary; RE2's own `\\b` is ASCII-only), and
whitespace inside a term matches any run of whitespace. Both are matched on the normalised
view of the text (normalize.py), so terms are normalised the same way before compiling.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator

try:
    import re2 as _re2
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("aion_train.policy needs the google-re2 package (pip install 'google-re2>=1.1')") from e

try:  # Python >= 3.11
    from re import _constants as _C
    from re import _parser as _P
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _C  # type: ignore[no-redef]
    import sre_parse as _P  # type: ignore[no-redef]

from .normalize import normalize_text

RE2Error = _re2.error

#: A repeat with an upper bound above this counts as unbounded.
LARGE_REPEAT = 10
MAX_GROUP_DEPTH = 32
_MAX_CP = 0x10FFFF
_WORD_CLASS = r"\pL\pN\pM_"


class PatternIssue(ValueError):
    """A pattern that the platform refuses (message is user-facing)."""


#: RE2 memory budget of one compiled pattern / term list. Beyond it RE2 refuses to compile
#: (quickly), which bounds the compile time of a single hostile pattern like `\pL{1000}`.
PATTERN_MAX_MEM = 2 << 20
TERMS_MAX_MEM = 8 << 20
#: What a pattern that RE2 found too large counts against a policy's program budget.
TOO_LARGE_COST = 500_000


def _options(max_mem: int = PATTERN_MAX_MEM):
    o = _re2.Options()
    o.log_errors = False  # errors come back as exceptions, not on stderr
    o.max_mem = max_mem
    return o


def program_size(rx) -> int:
    """Instructions in RE2's compiled program (compile time and memory grow with it)."""
    inner = getattr(rx, "_regexp", None)
    try:
        return int(inner.ProgramSize())
    except Exception:  # noqa: BLE001 - wrapper internals moved: fall back to pattern length
        return len(getattr(rx, "pattern", "")) * 10


def is_too_large(issue: Exception) -> bool:
    return "pattern too large" in str(issue)


def _re2_message(err: Exception) -> str:
    msg = err.args[0] if err.args else str(err)
    if isinstance(msg, bytes):
        msg = msg.decode("utf-8", "replace")
    return str(msg)


def compile_pattern(pattern: str, casefold: bool = False):
    """Check and compile one policy pattern; raises PatternIssue with a clear message.

    `casefold`: the rule matches a case-folded view, and the pattern ignores case too (so
    that `[A-Z]` still means letters)."""
    try:
        rx = _re2.compile(("(?i)" if casefold else "") + pattern, _options())
    except RE2Error as e:
        msg = _re2_message(e)
        hint = ""
        if "invalid perl operator" in msg or "invalid escape" in msg:
            hint = " (RE2 has no backreferences or lookarounds)"
        elif "too large" in msg:
            hint = (
                f" (over RE2's {PATTERN_MAX_MEM >> 20} MiB program limit; use smaller "
                "counted repeats, e.g. \\pL{1,20} rather than \\pL{1000})"
            )
        raise PatternIssue(f"not a valid RE2 pattern: {msg}{hint}") from None
    check_pattern(("(?i)" if casefold else "") + pattern)
    return rx


def normalized_terms(terms: list[str], casefold: bool = True) -> list[str]:
    """The terms as matched: normalised like the text (NFKC, ignorables removed, case-folded
    unless `casefold` is false), whitespace runs as one space; raises PatternIssue for a term
    that normalises to nothing."""
    out = []
    for t in terms:
        n = " ".join(normalize_text(t, casefold).split())
        if not n:
            raise PatternIssue(
                f"term {t[:40]!r} is empty once normalised (only default-ignorable characters "
                "such as zero-width spaces or soft hyphens); remove it"
            )
        out.append(n)
    return out


def compile_terms(terms: list[str], casefold: bool = True):
    """One RE2 regex for a term list; group 1 of a match is the term itself."""
    alts = []
    for t in sorted(set(normalized_terms(terms, casefold)), key=lambda s: (-len(s), s)):
        parts = [_re2.escape(p) for p in t.split()]
        alts.append(r"\s+".join(parts))
    body = "|".join(alts)
    flags = "(?i)" if casefold else ""
    pattern = rf"{flags}(?:^|[^{_WORD_CLASS}])({body})(?:[^{_WORD_CLASS}]|$)"
    try:
        return _re2.compile(pattern, _options(TERMS_MAX_MEM))
    except RE2Error as e:
        raise PatternIssue(f"term list does not compile: {_re2_message(e)}") from None


def term_spans(rx, data: bytes) -> Iterator[tuple[int, int]]:
    """Byte spans of the terms of `compile_terms` in UTF-8 `data`, left to right.

    The boundary characters are consumed by the regex, so the next search starts at the end
    of the term (not of the match): "foo foo" finds both. One pass over `data`.
    """
    pos, n = 0, len(data)
    while pos <= n:
        m = rx.search(data, pos)
        if m is None:
            return
        s, e = m.span(1)
        yield s, e
        pos = e if e > pos else pos + 1


def pattern_spans(rx, data: bytes) -> Iterator[tuple[int, int]]:
    for m in rx.finditer(data):
        s, e = m.span()
        if e > s:
            yield s, e


# --------------------------------------------------------------------------- widths
#: A width over this many characters counts as unbounded.
UNBOUNDED = 10_000


def pattern_width(pattern: str) -> int | None:
    """Most characters (of the normalised view) a policy pattern can match (None: unbounded
    or unknown)."""
    try:
        translated, _ = _translate_re2(pattern)
        hi = _P.parse(translated).getwidth()[1]
    except Exception:  # noqa: BLE001 - anything the parser cannot read counts as unbounded
        return None
    return None if hi > UNBOUNDED else int(hi)


def terms_width(terms, casefold: bool = True) -> int | None:
    """A term list's regex consumes a boundary character either side of the term; a term of
    several words matches any run of whitespace between them (unbounded). Measured on the
    normalised terms (case folding can lengthen a term: "ß" -> "ss")."""
    norm = normalized_terms(list(terms), casefold)
    if any(len(t.split()) > 1 for t in norm):
        return None
    return max(len(t) for t in norm) + 2


def rule_widths(rule: dict) -> list[int | None]:
    """The widths of a rule document's passes (its term list, then each pattern)."""
    cf = bool(rule.get("casefold", "terms" in rule))
    out: list[int | None] = []
    if "terms" in rule:
        out.append(terms_width(rule["terms"], cf))
    out.extend(pattern_width(p) for p in rule.get("patterns", []))
    return out


def holds_whole_output(policy: dict) -> bool:
    """Whether streaming under this (resolved) policy document must hold the whole output
    until generation ends: output moderation or a block rule (either can withdraw
    everything), or a redact rule of unbounded width (`[0-9]+`, a multi-word term) whose
    match could reach back over any amount of text. Otherwise text is held back only while a
    rule could still match it."""
    if (policy.get("output_moderation") or {}).get("enabled"):
        return True
    for rule in policy.get("rules", []):
        if rule.get("action") == "block":
            return True
        if rule.get("action") == "redact" and any(w is None for w in rule_widths(rule)):
            return True
    return False


# --------------------------------------------------------------------------- static check
def check_pattern(pattern: str) -> None:
    """Raise PatternIssue for nested/ambiguous unbounded repeats or empty-matching patterns."""
    translated, ignorecase = _translate_re2(pattern)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = _P.parse(translated)
    except (re.error, RecursionError, OverflowError, ValueError) as e:
        raise PatternIssue(
            f"pattern cannot be checked for nested quantifiers ({e}); rewrite it with plain RE2/Perl syntax"
        ) from None
    ignorecase = ignorecase or bool(parsed.state.flags & _C.SRE_FLAG_IGNORECASE)
    _walk(list(parsed), in_large=False, ic=ignorecase)
    if _nullable(list(parsed)):
        raise PatternIssue(
            "pattern can match the empty string (it would match at every position); make at least one part mandatory"
        )


def _translate_re2(p: str) -> tuple[str, bool]:
    """RE2 syntax -> Python `re` syntax with the same repeat/alternation structure.

    Returns (python pattern, whether some inline flag turns on case-insensitivity).

    * every alternative is wrapped in a capturing group, so that Python's parser neither
      merges single-character alternatives into a set (`\\d|\\w` -> `[\\d\\w]`) nor factors
      out common prefixes (`a|aa` -> `a(?:|a)`): the check sees the alternation as written;
    * character classes that Python lacks (`\\pL`, `[[:alpha:]]`, `\\C`) become "any
      character", the conservative choice for the overlap check;
    * flag-only groups like `(?i)` (RE2 allows them anywhere, Python 3.11 only at the start)
      are dropped; an `i` in any of them makes the whole check case-insensitive;
    * group nesting is bounded by MAX_GROUP_DEPTH.
    """
    out: list[str] = ["("]
    i, n = 0, len(p)
    depth = 0
    ignorecase = False
    any_outside, any_inside = r"[\s\S]", r"\s\S"

    def escape_at(j: int, inside: bool) -> tuple[str, int]:
        # p[j] == '\\'; returns (replacement, next index)
        if j + 1 >= n:
            return "\\\\", j + 1
        c = p[j + 1]
        if c in "pP":
            if j + 2 < n and p[j + 2] == "{":
                k = p.find("}", j + 3)
                k = n - 1 if k < 0 else k
                return (any_inside if inside else any_outside), k + 1
            return (any_inside if inside else any_outside), min(j + 3, n)
        if c == "C":
            return (any_inside if inside else any_outside), j + 2
        if c == "z":
            return (r"\Z" if not inside else "z"), j + 2
        if c == "x" and j + 2 < n and p[j + 2] == "{":
            k = p.find("}", j + 3)
            if k > 0:
                try:
                    cp = int(p[j + 3 : k], 16)
                except ValueError:
                    cp = -1
                if 0 <= cp <= _MAX_CP:
                    return f"\\U{cp:08x}", k + 1
            return "x", j + 2
        if c == "Q":
            k = p.find(r"\E", j + 2)
            lit = p[j + 2 :] if k < 0 else p[j + 2 : k]
            return "(?:" + re.escape(lit) + ")", (n if k < 0 else k + 2)
        return p[j : j + 2], j + 2

    while i < n:
        c = p[i]
        if c == "\\":
            rep, i = escape_at(i, inside=False)
            out.append(rep)
        elif c == "[":
            out.append("[")
            i += 1
            if i < n and p[i] == "^":
                out.append("^")
                i += 1
            if i < n and p[i] == "]":
                out.append(r"\]")
                i += 1
            while i < n and p[i] != "]":
                if p[i] == "\\":
                    rep, i = escape_at(i, inside=True)
                    out.append(rep)
                elif p[i] == "[" and i + 1 < n and p[i + 1] == ":":
                    k = p.find(":]", i + 2)
                    if k < 0:
                        out.append(r"\[")
                        i += 1
                    else:
                        out.append(any_inside)
                        i = k + 2
                elif p[i] == "[":
                    out.append(r"\[")
                    i += 1
                else:
                    out.append(p[i])
                    i += 1
            if i < n:
                out.append("]")
                i += 1
        elif c == "(":
            if p.startswith("(?", i) and not p.startswith("(?P", i) and not p.startswith("(?<", i):
                j = i + 2
                while j < n and p[j] in "imsU-":
                    j += 1
                flags = p[i + 2 : j]
                if j < n and p[j] == ")":  # flag-only group: drop it
                    ignorecase |= "i" in flags.split("-")[0]
                    i = j + 1
                    continue
                if j < n and p[j] == ":":
                    on, _, off = flags.replace("U", "").partition("-")
                    ignorecase |= "i" in on
                    prefix = "(?" + on + ("-" + off if off else "") + ":"
                    if prefix == "(?:":
                        prefix = "(?:"
                    i = j + 1
                else:  # let Python report it
                    prefix = "("
                    i += 1
            elif p.startswith("(?<", i) and not p.startswith("(?<=", i) and not p.startswith("(?<!", i):
                k = p.find(">", i)
                if k < 0:
                    prefix, i = "(", i + 1
                else:
                    prefix, i = "(?P" + p[i + 2 : k + 1], k + 1
            elif p.startswith("(?P<", i):
                k = p.find(">", i)
                prefix, i = (p[i : k + 1], k + 1) if k > 0 else ("(", i + 1)
            else:
                prefix, i = "(", i + 1
            depth += 1
            if depth > MAX_GROUP_DEPTH:
                raise PatternIssue(f"groups nested more than {MAX_GROUP_DEPTH} deep")
            out.append(prefix + "(")  # group + wrapper of 1st alternative
        elif c == ")":
            depth = max(0, depth - 1)
            out.append("))")
            i += 1
        elif c == "|":
            out.append(")|(")
            i += 1
        else:
            out.append(c)
            i += 1
    out.append(")")
    return "".join(out), ignorecase


_REPEATS = {_C.MAX_REPEAT, _C.MIN_REPEAT}
if hasattr(_C, "POSSESSIVE_REPEAT"):
    _REPEATS.add(_C.POSSESSIVE_REPEAT)


def _is_large(hi) -> bool:
    return hi == _C.MAXREPEAT or hi > LARGE_REPEAT


def _walk(items: list, in_large: bool, ic: bool) -> None:
    for op, av in items:
        if op in _REPEATS:
            lo, hi, body = av
            body = list(body)
            if _is_large(hi):
                if in_large:
                    raise PatternIssue(
                        "nested quantifier: an unbounded repeat inside another unbounded "
                        "repeat (like (a+)+ or (a*)*) backtracks exponentially in other "
                        "engines; rewrite it without the nesting"
                    )
                if _nullable(body):
                    raise PatternIssue(
                        "nested quantifier: the repeated part can match the empty string "
                        "(like (a?)* or (a|)+); make it match at least one character"
                    )
                _walk(body, True, ic)
            else:
                _walk(body, in_large, ic)
        elif op == _C.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            sub_ic = ic
            if add_flags & _C.SRE_FLAG_IGNORECASE:
                sub_ic = True
            if del_flags & _C.SRE_FLAG_IGNORECASE:
                sub_ic = False
            _walk(list(sub), in_large, sub_ic)
        elif op == _C.BRANCH:
            alts = [list(a) for a in av[1]]
            if in_large:
                _check_alternation(alts, ic)
            for a in alts:
                _walk(a, in_large, ic)
        elif op in (_C.ASSERT, _C.ASSERT_NOT):
            _walk(list(av[1]), in_large, ic)
        elif hasattr(_C, "ATOMIC_GROUP") and op == _C.ATOMIC_GROUP:
            _walk(list(av), in_large, ic)
        elif op == _C.GROUPREF_EXISTS:
            _walk(list(av[1]), in_large, ic)
            if av[2] is not None:
                _walk(list(av[2]), in_large, ic)


def _check_alternation(alts: list[list], ic: bool) -> None:
    for x in range(len(alts)):
        for y in range(x + 1, len(alts)):
            if _alts_overlap(alts[x], alts[y], ic):
                raise PatternIssue(
                    "ambiguous alternation inside an unbounded repeat (like (a|aa)+): "
                    f"alternatives {x + 1} and {y + 1} can match the same text or one a "
                    "prefix of the other; backtracking engines try every split, "
                    "exponentially"
                )


def _group_ignorecase(av, ic: bool) -> bool:
    """Case-insensitivity inside a group `(?i:...)` / `(?-i:...)` (its add and remove flags)."""
    if av[2] & _C.SRE_FLAG_IGNORECASE:
        return False
    return True if av[1] & _C.SRE_FLAG_IGNORECASE else ic


_SINGLE = {_C.LITERAL, _C.NOT_LITERAL, _C.IN, _C.ANY, _C.CATEGORY, _C.RANGE}


def _flatten(items: list, ic: bool) -> list:
    """Leading single-character steps of a sequence as char sets; a final ('rest', items)
    marks where something else (repeat, branch, anchor) starts."""
    out: list = []
    todo = [(list(items), ic)]
    while todo:
        seq, cur_ic = todo.pop(0)
        for k, (op, av) in enumerate(seq):
            if op in _SINGLE:
                out.append(_first_item(op, av, cur_ic))
            elif op == _C.SUBPATTERN:
                todo.insert(0, (seq[k + 1 :], cur_ic))
                todo.insert(0, (list(av[3]), _group_ignorecase(av, cur_ic)))
                break
            else:
                out.append(("rest", seq[k:], cur_ic))
                return out
    return out


def _alts_overlap(a: list, b: list, ic: bool) -> bool:
    """Can two alternatives match a common string, or one a prefix of the other's match?

    Walks both in lockstep over single-character steps: disjoint sets at some position ->
    no overlap; one side running out (or reaching a repeat/branch whose first characters
    meet the other side's) -> overlap (conservative)."""
    fa, fb = _flatten(a, ic), _flatten(b, ic)
    for k in range(max(len(fa), len(fb))):
        if k >= len(fa) or k >= len(fb):
            return True  # one is a prefix of the other
        x, y = fa[k], fb[k]
        xs = _first(x[1], x[2]) if isinstance(x, tuple) else x
        ys = _first(y[1], y[2]) if isinstance(y, tuple) else y
        if isinstance(x, tuple) and _nullable(x[1]):
            return True
        if isinstance(y, tuple) and _nullable(y[1]):
            return True
        if not _intersects(xs, ys):
            return False
        if isinstance(x, tuple) or isinstance(y, tuple):
            return True  # cannot follow further
    return True  # same length, all steps meet


def _nullable(items: list) -> bool:
    return all(_nullable_item(op, av) for op, av in items)


def _nullable_item(op, av) -> bool:
    if op in _REPEATS:
        return av[0] == 0 or _nullable(list(av[2]))
    if op == _C.SUBPATTERN:
        return _nullable(list(av[3]))
    if op == _C.BRANCH:
        return any(_nullable(list(a)) for a in av[1])
    if op in (_C.LITERAL, _C.NOT_LITERAL, _C.IN, _C.ANY, _C.RANGE, _C.CATEGORY):
        return False
    if hasattr(_C, "ATOMIC_GROUP") and op == _C.ATOMIC_GROUP:
        return _nullable(list(av))
    return True  # AT (anchors), asserts, group references: zero width / unknown


# First-character sets as sorted lists of closed code point intervals.
_FULL = [(0, _MAX_CP)]
_NON_ASCII = (0x80, _MAX_CP)
_ASCII = {
    _C.CATEGORY_DIGIT: [(48, 57)],
    _C.CATEGORY_SPACE: [(9, 13), (32, 32)],
    _C.CATEGORY_WORD: [(48, 57), (65, 90), (95, 95), (97, 122)],
}
_NEG = {
    _C.CATEGORY_NOT_DIGIT: _C.CATEGORY_DIGIT,
    _C.CATEGORY_NOT_SPACE: _C.CATEGORY_SPACE,
    _C.CATEGORY_NOT_WORD: _C.CATEGORY_WORD,
}


def _complement(iv: list[tuple[int, int]], hi: int = _MAX_CP) -> list[tuple[int, int]]:
    out, start = [], 0
    for a, b in sorted(iv):
        if a > start:
            out.append((start, a - 1))
        start = max(start, b + 1)
    if start <= hi:
        out.append((start, hi))
    return out


def _category(cat) -> list[tuple[int, int]]:
    # Non-ASCII is counted in every class and its negation: engines disagree on Unicode \w.
    if cat in _ASCII:
        return _ASCII[cat] + [_NON_ASCII]
    if cat in _NEG:
        return _complement(_ASCII[_NEG[cat]], 0x7F) + [_NON_ASCII]
    return list(_FULL)


def _fold(iv: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = list(iv)
    for a, b in iv:
        if b >= 0x80:
            out.append(_NON_ASCII)
        if a <= 122 and b >= 65:
            out.extend([(65, 90), (97, 122)])
    return out


def _literal(cp: int, ic: bool) -> list[tuple[int, int]]:
    iv = [(cp, cp)]
    if ic:
        ch = chr(cp)
        for v in (ch.lower(), ch.upper(), ch.swapcase(), ch.casefold()):
            if len(v) == 1:
                iv.append((ord(v), ord(v)))
        if cp >= 0x80 or chr(cp).lower() in "ks":  # Kelvin sign, long s, ...
            iv.append(_NON_ASCII)
    return iv


def _first_item(op, av, ic: bool) -> list[tuple[int, int]]:
    if op == _C.LITERAL:
        return _literal(av, ic)
    if op == _C.NOT_LITERAL:
        return _complement(_literal(av, ic)) if not ic else list(_FULL)
    if op == _C.ANY:
        return list(_FULL)
    if op == _C.CATEGORY:
        return _category(av)
    if op == _C.RANGE:
        return _fold([av]) if ic else [av]
    if op == _C.IN:
        negate = False
        iv: list[tuple[int, int]] = []
        for sop, sav in av:
            if sop == _C.NEGATE:
                negate = True
            elif sop == _C.LITERAL:
                iv.extend(_literal(sav, ic))
            elif sop == _C.RANGE:
                iv.extend(_fold([sav]) if ic else [sav])
            elif sop == _C.CATEGORY:
                iv.extend(_category(sav))
            else:
                return list(_FULL)
        if negate:
            return list(_FULL) if ic else _complement(iv) + [_NON_ASCII]
        return iv
    if op in _REPEATS:
        return _first(list(av[2]), ic)
    if op == _C.SUBPATTERN:
        return _first(list(av[3]), _group_ignorecase(av, ic))
    if op == _C.BRANCH:
        out: list[tuple[int, int]] = []
        for a in av[1]:
            out.extend(_first(list(a), ic))
        return out
    if op == _C.AT or op in (_C.ASSERT, _C.ASSERT_NOT):
        return []
    return list(_FULL)


def _first(items: list, ic: bool) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for op, av in items:
        out.extend(_first_item(op, av, ic))
        if not _nullable_item(op, av):
            break
    return out


def _intersects(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> bool:
    return any(x0 <= y1 and y0 <= x1 for x0, x1 in a for y0, y1 in b)
