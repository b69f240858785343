"""Character chunking with overlap, breaking at paragraph/sentence/word boundaries."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_WS = re.compile(r"\s+")


@dataclass
class Chunk:
    text: str
    source: str = ""  # document id the chunk came from
    start: int = 0  # character offset of the chunk in its (cleaned) document
    meta: dict = field(default_factory=dict)


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    text = re.sub(r"[ \f\v]+", " ", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _break_at(text: str, lo: int, hi: int) -> int:
    """Best cut position in text[lo:hi]: after the last paragraph break, else the last
    sentence end, else the last whitespace; ``hi`` if there is none."""
    window = text[lo:hi]
    for pat in ("\n\n", ". ", ".\n", "\n", " "):
        j = window.rfind(pat)
        if j >= 0:
            return lo + j + len(pat)
    return hi


def chunk_text(text: str, chunk_chars: int = 512, overlap: int = 64) -> list[tuple[int, str]]:
    """``[(start, chunk), ...]`` covering ``text``: each chunk has at most ``chunk_chars``
    characters, consecutive chunks share about ``overlap`` characters, and cuts fall on
    the nearest boundary in the last quarter of the window (paragraph > sentence > word)."""
    if chunk_chars <= 0 or not 0 <= overlap < chunk_chars:
        raise ValueError(f"need chunk_chars > 0 and 0 <= overlap < chunk_chars, got {chunk_chars}, {overlap}")
    text = _clean(text)
    n = len(text)
    out: list[tuple[int, str]] = []
    start = 0
    while start < n:
        end = min(start + chunk_chars, n)
        if end < n:
            end = _break_at(text, start + (3 * chunk_chars) // 4, end)
        piece = text[start:end].strip()
        if piece:
            out.append((start, piece))
        if end >= n:
            break
        nxt = max(end - overlap, start + 1)
        if overlap:  # start the overlap on a word boundary
            sp = text.find(" ", nxt, end)
            nl = text.find("\n", nxt, end)
            cands = [c for c in (sp, nl) if c >= 0]
            if cands:
                nxt = min(cands) + 1
        start = nxt
    return out


def chunk_documents(
    docs, chunk_chars: int = 512, overlap: int = 64, max_chunks_per_doc: int | None = None, dedup: bool = True
) -> list[Chunk]:
    """Chunk ``docs`` (objects with ``.source`` and ``.text``, or ``(source, text)``
    pairs). With ``dedup``, a chunk whose whitespace-normalised text was already seen is
    dropped (licence and boilerplate paragraphs repeat across files)."""
    seen: set[str] = set()
    out: list[Chunk] = []
    for d in docs:
        source, text = (d.source, d.text) if hasattr(d, "text") else d
        pieces = chunk_text(text, chunk_chars, overlap)
        if max_chunks_per_doc is not None:
            pieces = pieces[:max_chunks_per_doc]
        for start, piece in pieces:
            if dedup:
                key = _WS.sub(" ", piece).lower()
                if key in seen:
                    continue
                seen.add(key)
            out.append(Chunk(piece, source, start))
    return out
