"""The normalised view of a text that policy patterns and term lists are matched on.

`normalized_view(text, casefold)` returns a `View`: the text with Unicode default-ignorable
code points removed (zero-width spaces, soft hyphens, joiners, bidi controls, variation
selectors, ...), then NFKC-normalised (fullwidth letters, ligatures and other compatibility
forms become their plain equivalents; a letter and its combining marks compose), and
case-folded (`str.casefold`) when the rule asks for it, plus a map from every match in the
view back to the characters of the original text it came from.

Segments. The text is cut before every character that cannot interact with the characters
before it under normalisation: a starter (canonical combining class 0) that is never the
second half of a canonical composition and whose decomposition starts with a starter (so
not a combining mark, not a Hangul vowel or final consonant jamo, not U+0CD5 and the like).
Ignorable characters belong to no segment and never cut one (`e`, ZWSP, U+0301 is the
segment `e` U+0301, which normalises to `é`). Each segment is normalised on its own; its
view depends only on its own characters, so the segments before the last one of a prefix
are final whatever text follows (streaming relies on this, see `View.final_bytes`).

Mapping back. A match covering view bytes [s, e) maps to the original characters from the
first non-ignorable character of the segment holding byte s to the last non-ignorable
character of the segment holding byte e - 1: ignorables inside a match are part of it,
ignorables just outside it are not. A match that covers part of a segment (the `f` of the
ligature `ﬁ`) takes the whole segment.

Default-ignorable code points are derived from the Unicode Character Database the way
DerivedCoreProperties.txt defines them: Other_Default_Ignorable_Code_Point + Cf +
Variation_Selector - White_Space - U+FFF9..U+FFFB - U+13430..U+1343F -
Prepended_Concatenation_Mark, with the general categories from `unicodedata` (so the view
does not depend on which optional packages are installed).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from bisect import bisect_right
from dataclasses import dataclass

# PropList.txt: Other_Default_Ignorable_Code_Point and Variation_Selector.
_OTHER_DI = (
    (0x034F, 0x034F),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x2065, 0x2065),
    (0x3164, 0x3164),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0xE0000, 0xE0000),
    (0xE0002, 0xE001F),
    (0xE0080, 0xE00FF),
    (0xE01F0, 0xE0FFF),
)
_VARIATION_SELECTORS = ((0x180B, 0x180D), (0x180F, 0x180F), (0xFE00, 0xFE0F), (0xE0100, 0xE01EF))
# Cf characters that are not default-ignorable (they are visible or shape their neighbours).
_NOT_DI = (
    (0x0600, 0x0605),  # Prepended_Concatenation_Mark
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0xFFF9, 0xFFFB),  # interlinear annotation
    (0x13430, 0x1343F),  # Egyptian hieroglyph format controls
)
_WHITE_SPACE = frozenset([*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029])
_WHITE_SPACE |= frozenset([0x202F, 0x205F, 0x3000])
# Hangul jamo that compose algorithmically (no entry in the decomposition data).
_HANGUL_V = (0x1161, 0x1175)
_HANGUL_T = (0x11A8, 0x11C2)
_ASCII_RUN = re.compile(r"[\x00-\x7f]+")


def _ranges(rs):
    for lo, hi in rs:
        yield from range(lo, hi + 1)


@functools.cache
def _tables() -> tuple[frozenset[int], frozenset[int]]:
    """(default-ignorable code points, code points that can change the text before them)."""
    ignorable = set(_ranges(_OTHER_DI)) | set(_ranges(_VARIATION_SELECTORS))
    joins = set(_ranges((_HANGUL_V, _HANGUL_T)))
    for cp in [*range(0x80, 0x20000), *range(0xE0000, 0xE1000)]:
        c = chr(cp)
        if unicodedata.category(c) == "Cf":
            ignorable.add(cp)
        if unicodedata.combining(c):
            joins.add(cp)
        d = unicodedata.decomposition(c)
        if d and not d.startswith("<"):
            parts = d.split()
            if len(parts) == 2:
                joins.add(int(parts[1], 16))  # second half of a canonical composition
        if d and unicodedata.combining(c) == 0:
            first = unicodedata.normalize("NFKD", c)[:1]
            if first and unicodedata.combining(first):
                joins.add(cp)  # a starter that decomposes to a non-starter first
    ignorable -= set(_ranges(_NOT_DI))
    ignorable -= _WHITE_SPACE
    return frozenset(ignorable), frozenset(joins)


@functools.cache
def _special() -> re.Pattern:
    """A character class of every non-ASCII character that is ignorable or does not start a
    segment: a text without any is cut before every character."""
    ignorable, joins = _tables()
    cps = sorted(ignorable | joins)
    parts, i = [], 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        parts.append(f"\\U{cps[i]:08x}" + (f"-\\U{cps[j]:08x}" if j > i else ""))
        i = j + 1
    return re.compile("[" + "".join(parts) + "]")


@functools.lru_cache(maxsize=16384)
def _segment_view(seg: str, casefold: bool) -> bytes:
    v = _strip_ignorable(unicodedata.normalize("NFKC", seg))
    return (v.casefold() if casefold else v).encode("utf-8")


def warm_up() -> None:
    """Build the tables now (about half a second, once per process) rather than on the first
    non-ASCII text a policy sees."""
    _special()


def default_ignorable(cp: int) -> bool:
    return cp in _tables()[0]


@functools.lru_cache(maxsize=8192)
def _kind(c: str) -> int:
    """0: ignorable, 1: starts a segment, 2: continues the segment before it."""
    ignorable, joins = _tables()
    cp = ord(c)
    if cp in ignorable:
        return 0
    if unicodedata.combining(c) or cp in joins:
        return 2
    return 1


def _strip_ignorable(s: str) -> str:
    ignorable = _tables()[0]
    return "".join(c for c in s if ord(c) not in ignorable) if not s.isascii() else s


def normalize_text(s: str, casefold: bool = False) -> str:
    """The view of `s` as a string (what `normalized_view(s, casefold).data` decodes to)."""
    return normalized_view(s, casefold).data.decode("utf-8")


@dataclass(frozen=True)
class View:
    """The normalised view of `text` (`data`, UTF-8) and its map back to `text`.

    `_vb[k]` is the first view byte of piece k, `_os[k]`/`_oe[k]` its original characters.
    A piece is one segment, or (`_run[k]`) a run of ASCII characters that are each a segment
    of one byte. None for an all-ASCII text (view byte i is original character i)."""

    text: str
    data: bytes
    _vb: list[int] | None = None
    _os: list[int] | None = None
    _oe: list[int] | None = None
    _run: list[bool] | None = None
    #: every character is a segment whose view is one character (view character i is
    #: original character i); [byte, char] of the last lookup, as a cursor
    _chars: list[int] | None = None

    def _char_at(self, b: int) -> int:
        cur = self._chars
        if b < cur[0]:
            cur[0] = cur[1] = 0
        cur[1] += len(self.data[cur[0] : b].decode("utf-8"))
        cur[0] = b
        return cur[1]

    def orig_span(self, s: int, e: int) -> tuple[int, int]:
        """Original character span of the view bytes [s, e) (e > s)."""
        if self._chars is not None:
            return self._char_at(s), self._char_at(e)
        if self._vb is None:
            return s, e
        i = bisect_right(self._vb, s) - 1
        j = bisect_right(self._vb, e - 1) - 1
        os_ = self._os[i] + (s - self._vb[i]) if self._run[i] else self._os[i]
        oe_ = self._os[j] + (e - self._vb[j]) if self._run[j] else self._oe[j]
        return os_, oe_

    def orig_at(self, b: int) -> int:
        """Original index of the start of the segment holding view byte b (b <= 0: 0; past
        the end: len(text)). Nothing before it is part of a match starting at or after b."""
        if b <= 0:
            return 0
        if b >= len(self.data):
            return len(self.text)
        if self._chars is not None:
            return self._char_at(b)
        if self._vb is None:
            return b
        i = bisect_right(self._vb, b) - 1
        return self._os[i] + (b - self._vb[i]) if self._run[i] else self._os[i]

    def final_bytes(self, settled: int) -> int:
        """View bytes that stay the same whatever replaces text[settled:] (text[:settled]
        final): those before the last segment that starts before `settled`."""
        if settled <= 0:
            return 0
        if self._chars is not None:
            return len(self.data.decode("utf-8")[: min(settled, len(self.text)) - 1].encode("utf-8"))
        if self._vb is None:
            return min(settled, len(self.text)) - 1
        # last piece starting before `settled`
        k = bisect_right(self._os, settled - 1) - 1
        if k < 0:
            return 0
        if self._run[k]:
            # characters of the run before `settled` - 1 are whole segments
            return self._vb[k] + max(0, min(settled, self._oe[k]) - 1 - self._os[k])
        return self._vb[k]


def normalized_view(text: str, casefold: bool = False) -> View:
    """See the module docstring. `text` must have no lone surrogates."""
    if text.isascii():
        return View(text, (text.lower() if casefold else text).encode("ascii"))
    if _special().search(text) is None and unicodedata.is_normalized("NFKC", text):
        # every character is a segment of its own and normalises to itself
        folded = text.casefold() if casefold else text
        if len(folded) == len(text):
            return View(text, folded.encode("utf-8"), _chars=[0, 0])
    vb: list[int] = []
    os_: list[int] = []
    oe: list[int] = []
    run: list[bool] = []
    parts: list[bytes] = []
    nbytes = 0
    seg: list[str] = []
    seg_start = seg_end = 0

    def flush() -> None:
        nonlocal nbytes, seg
        if not seg:
            return
        b = _segment_view("".join(seg), casefold)
        vb.append(nbytes)
        os_.append(seg_start)
        oe.append(seg_end)
        run.append(False)
        parts.append(b)
        nbytes += len(b)
        seg = []

    pos = 0
    n = len(text)
    while pos < n:
        m = _ASCII_RUN.match(text, pos)
        if m is not None:
            a, b = m.span()
            # every ASCII character starts a segment; the last one may take combining marks
            flush()
            if b - a > 1:
                chunk = text[a : b - 1]
                vb.append(nbytes)
                os_.append(a)
                oe.append(b - 1)
                run.append(True)
                parts.append((chunk.lower() if casefold else chunk).encode("ascii"))
                nbytes += b - 1 - a
            seg, seg_start, seg_end = [text[b - 1]], b - 1, b
            pos = b
            continue
        c = text[pos]
        k = _kind(c)
        if k == 1 or (k == 2 and not seg):
            flush()
            seg, seg_start = [c], pos
            seg_end = pos + 1
        elif k == 2:
            seg.append(c)
            seg_end = pos + 1
        pos += 1
    flush()
    return View(text, b"".join(parts), vb, os_, oe, run)
