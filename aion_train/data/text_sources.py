"""Real English text that ships with the machine, so the demo needs no download.

Sources, in this fixed order:

* ``pydoc_data.topics.topics``: the Python reference manual sections that every CPython
  installs for ``help()`` (about 0.5 MB of prose and code examples);
* ``/usr/share/common-licenses/*`` when present (Debian/Ubuntu): the GPL, Apache, MPL, ...
  licence texts. Symlinks (``GPL -> GPL-3``) are read once.

Each source is cut into paragraphs at blank lines; consecutive paragraphs of one source are
joined into documents of roughly ``target_chars`` characters, never crossing a source.
Paragraphs already seen (the licences repeat each other word for word) are dropped, so that
a held-out split does not contain verbatim copies of training text. Everything is
deterministic: same machine content, same documents in the same order.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator

LICENSES_DIR = "/usr/share/common-licenses"

_BLANK_LINES = re.compile(r"\n[ \t\f\v]*\n+")


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n")
    text = text.expandtabs(8)
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs of ``text``: blocks separated by one or more blank lines, stripped."""
    return [p.strip("\n") for p in _BLANK_LINES.split(_clean(text)) if p.strip()]


def pack_paragraphs(paragraphs: Iterable[str], target_chars: int = 1000, min_chars: int = 200) -> list[str]:
    """Join consecutive paragraphs (with a blank line) into documents of >= target_chars
    characters; a short remainder (< min_chars) is appended to the previous document."""
    docs: list[str] = []
    cur: list[str] = []
    size = 0
    for p in paragraphs:
        cur.append(p)
        size += len(p) + 2
        if size >= target_chars:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        tail = "\n\n".join(cur)
        if docs and len(tail) < min_chars:
            docs[-1] = docs[-1] + "\n\n" + tail
        else:
            docs.append(tail)
    return docs


def python_topic_texts() -> Iterator[tuple[str, str]]:
    """(name, text) for every pydoc topic, sorted by name."""
    from pydoc_data.topics import topics  # part of the standard library

    for name in sorted(topics):
        yield f"pydoc:{name}", topics[name]


def license_texts(directory: str = LICENSES_DIR) -> Iterator[tuple[str, str]]:
    """(name, text) for every regular licence file in ``directory`` (sorted, symlinks to a
    file already read are skipped); nothing when the directory does not exist."""
    if not os.path.isdir(directory):
        return
    seen: set[str] = set()
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        real = os.path.realpath(path)
        if real in seen or not os.path.isfile(real):
            continue
        seen.add(real)
        try:
            with open(real, "rb") as f:
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            continue
        yield f"license:{name}", text


def iter_sources() -> Iterator[tuple[str, str]]:
    yield from python_topic_texts()
    yield from license_texts()


def demo_documents(target_chars: int = 1000) -> list[str]:
    """The demo corpus: deduplicated paragraphs of every source packed into documents."""
    seen: set[str] = set()
    docs: list[str] = []
    for _name, text in iter_sources():
        paras = []
        for p in split_paragraphs(text):
            key = " ".join(p.split())
            if key in seen:
                continue
            seen.add(key)
            paras.append(p)
        docs.extend(pack_paragraphs(paras, target_chars=target_chars))
    return docs
