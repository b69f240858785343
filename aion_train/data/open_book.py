"""A checkable open-book task from the manual pages installed on this machine.

Every page becomes one document that states its command's one-line description, its manual
section and the Debian package that ships it; every document gives three questions with short
answers written in it. Questions are split by document (a seeded hash of the page's name), so a
held-out question is about a document the model never trained on: it can answer it only from a
retrieved `<CTX>` block.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

MAN_ROOT = "/usr/share/man"
DPKG_INFO = "/var/lib/dpkg/info"
MAX_DESCRIPTION_CHARS = 80  # a short, checkable answer
MAX_BODY_CHARS = 400

_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")  # \fB, \fI, \fR, \f(CW, \f[...]
_ESCAPES = {r"\-": "-", r"\(em": "-", r"\(en": "-", r"\e": "\\", r"\&": "", r"\ ": " ", r"\~": " ", r"\|": ""}
_OTHER_ESCAPE = re.compile(r"\\(\(..|\[[^\]]*\]|\*(\(..|\[[^\]]*\]|.)|s[-+]?\d|[/,:^])")
_SKIPPED_MACROS = ("IX", "de", "ds", "nr", "if", "ie", "el", "so", "ig", "tr")


@dataclass(frozen=True)
class ManPage:
    name: str
    section: str
    package: str
    description: str
    body: str  # the first paragraph of DESCRIPTION, plain text

    @property
    def doc_id(self) -> str:
        return f"man:{self.name}.{self.section}"

    def document(self) -> str:
        head = f"{self.name}({self.section}) is shipped by the Debian package {self.package}."
        line = f"{self.name} - {self.description}."
        return " ".join(p for p in (head, line, self.body) if p)


@dataclass(frozen=True)
class Example:
    doc_id: str
    question: str
    answer: str
    kind: str  # description | section | package


def roff_to_text(line: str) -> str:
    """One roff line as plain text: font changes and escapes removed, macros' arguments kept."""
    if line.startswith((".", "'")):
        parts = line[1:].split(None, 1)
        if not parts or parts[0] in _SKIPPED_MACROS or line.startswith(('.\\"', "'\\\"")):
            return ""
        line = parts[1] if len(parts) > 1 else ""
        line = line.replace('"', "")
    line = _FONT.sub("", line)
    for k, v in _ESCAPES.items():
        line = line.replace(k, v)
    return " ".join(_OTHER_ESCAPE.sub("", line).split())


def parse_man_page(source: str, section: str, package: str) -> ManPage | None:
    """The NAME line and the first DESCRIPTION paragraph of a roff page; None when the page has
    no single `name - description` NAME line (aliases, `.so` redirects, mdoc pages)."""
    lines = source.splitlines()
    name_line, body, where = None, [], None
    for raw in lines:
        if raw.startswith(".SH") or raw.startswith(".Sh"):
            where = roff_to_text(raw).upper()
            continue
        if where == "NAME" and name_line is None and raw.strip() and not raw.startswith("."):
            name_line = roff_to_text(raw)
        elif where == "DESCRIPTION":
            if raw.startswith((".PP", ".LP", ".P ", ".TP", ".IP", ".SS")) and body:
                break
            text = roff_to_text(raw)
            if text:
                body.append(text)
    if not name_line or " - " not in name_line:
        return None
    names, description = name_line.split(" - ", 1)
    if "," in names or " " in names.strip():
        return None
    description = description.strip().rstrip(".")
    if not description or len(description) > MAX_DESCRIPTION_CHARS:
        return None
    text = " ".join(body)
    if len(text) > MAX_BODY_CHARS:
        text = text[:MAX_BODY_CHARS].rsplit(" ", 1)[0] + " ..."
    return ManPage(names.strip(), section, package, description, text)


def package_of_paths(info_dir: str = DPKG_INFO) -> dict[str, str]:
    """Installed file path -> the Debian package that ships it (dpkg's own file lists)."""
    owners: dict[str, str] = {}
    for lst in sorted(Path(info_dir).glob("*.list")):
        pkg = lst.name[: -len(".list")].split(":")[0]
        for path in lst.read_text(errors="replace").splitlines():
            owners.setdefault(path, pkg)
    return owners


def read_man_pages(
    root: str = MAN_ROOT, sections: Iterable[str] = ("1", "8"), limit: int | None = None
) -> list[ManPage]:
    """The parseable pages of `sections` under `root`, sorted by name; one page per name."""
    owners = package_of_paths()
    pages: dict[str, ManPage] = {}
    for sec in sections:
        folder = Path(root) / f"man{sec}"
        for path in sorted(folder.glob("*.gz")) if folder.is_dir() else []:
            pkg = owners.get(str(path))
            if pkg is None:
                continue
            try:
                source = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
            except (OSError, EOFError):
                continue
            page = parse_man_page(source, sec, pkg)
            if page is not None and page.name not in pages and path.name.startswith(page.name + "."):
                pages[page.name] = page
            if limit is not None and len(pages) >= limit:
                break
    return [pages[k] for k in sorted(pages)]


def examples_of(page: ManPage) -> list[Example]:
    n = page.name
    return [
        Example(page.doc_id, f"What does the command {n} do?", page.description, "description"),
        Example(page.doc_id, f"In which manual section is {n}?", page.section, "section"),
        Example(page.doc_id, f"Which Debian package ships {n}?", page.package, "package"),
    ]


def is_held_out(doc_id: str, fraction: float, seed: int = 0) -> bool:
    """A seeded hash of the document's id: independent of order and of the other documents."""
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < fraction


def split_pages(pages: Iterable[ManPage], held_out_fraction: float = 0.2, seed: int = 0):
    """(train pages, held-out pages): every question of a page lands on its page's side."""
    train, held = [], []
    for p in pages:
        (held if is_held_out(p.doc_id, held_out_fraction, seed) else train).append(p)
    return train, held


def normalize_answer(text: str) -> str:
    """Casefolded, NFKC, punctuation dropped, whitespace collapsed; the first line only."""
    first = (text.strip().splitlines() or [""])[0]
    s = unicodedata.normalize("NFKC", first).casefold()
    s = re.sub(r"[^\w\s]", " ", s)
    return " ".join(s.split())


def is_correct(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def iter_examples(pages: Iterable[ManPage]) -> Iterator[Example]:
    for p in pages:
        yield from examples_of(p)
