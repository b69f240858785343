"""A checkable open-book task from the manual pages installed on this machine.

Every page becomes one document that states its command's one-line description, its manual
section and the Debian package that ships it; every document gives three questions with short
answers written in it. Questions are split by document (a seeded hash of the page's name), so a
held-out question is about a document the model never trained on: it can answer it only from a
retrieved `<CTX>` block.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .sources import MAN_DIR, Document, man_page_paths, parse_man_page

DPKG_INFO = "/var/lib/dpkg/info"
ANSWER_CUE = "\nAnswer:"
MAX_DESCRIPTION_CHARS = 80  # a short, checkable answer
MAX_BODY_CHARS = 400


@dataclass(frozen=True)
class OpenBookPage:
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


def task_page(page, section: str, package: str) -> OpenBookPage | None:
    """A parsed page (`sources.ManPage`) as a task document; None when its NAME line is not one
    command with a short description (aliases such as `gzip, gunzip, zcat` are left out)."""
    name = page.names.strip()
    description = " ".join(page.description.split()).rstrip(".")
    if not name or "," in name or " " in name or not description or len(description) > MAX_DESCRIPTION_CHARS:
        return None
    body = ""
    for part in page.body.split("\n\n"):
        if part.startswith("DESCRIPTION\n"):
            body = " ".join(part[len("DESCRIPTION\n") :].split())
            break
    if len(body) > MAX_BODY_CHARS:
        body = body[:MAX_BODY_CHARS].rsplit(" ", 1)[0] + " ..."
    return OpenBookPage(name, section, package, description, body)


def package_of_paths(info_dir: str = DPKG_INFO) -> dict[str, str]:
    """Installed file path -> the Debian package that ships it (dpkg's own file lists)."""
    owners: dict[str, str] = {}
    for lst in sorted(Path(info_dir).glob("*.list")):
        pkg = lst.name[: -len(".list")].split(":")[0]
        for path in lst.read_text(errors="replace").splitlines():
            owners.setdefault(path, pkg)
    return owners


def read_man_pages(sections: str = "18", man_dir: str = MAN_DIR) -> list[OpenBookPage]:
    """The task pages of `sections` (the installed, dpkg-owned pages), sorted by name; the first
    section wins when a name is in several."""
    owners = package_of_paths()
    pages: dict[str, OpenBookPage] = {}
    for path in man_page_paths(man_dir, sections):
        pkg = owners.get(path)
        if pkg is None:
            continue
        parsed = parse_man_page(path)
        section = os.path.basename(os.path.dirname(path))[len("man") :]
        page = task_page(parsed, section, pkg) if parsed is not None else None
        if page is not None and page.name not in pages and os.path.basename(path).startswith(page.name + "."):
            pages[page.name] = page
    return [pages[k] for k in sorted(pages)]


def examples_of(page: OpenBookPage) -> list[Example]:
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


def split_pages(pages: Iterable[OpenBookPage], held_out_fraction: float = 0.2, seed: int = 0):
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


def task_documents(pages: Iterable[OpenBookPage]) -> list[Document]:
    """The pages as retrieval documents (source = the page's doc id)."""
    return [Document(p.doc_id, p.document(), p.name) for p in pages]


def open_book_prompt(question: str, chunks: Sequence[str] = ()) -> str:
    """The prompt text of one question: `<CTX> chunks </CTX> question` with the answer cue;
    the question alone closed-book. Training and evaluation render it the same way."""
    from .hybrid import build_context

    body = build_context(chunks, question) if chunks else question
    return body + ANSWER_CUE


def sft_records(
    pages: Sequence[OpenBookPage], search, noise: int = 2, seed: int = 0, exclude=frozenset(), own_text=None
) -> list[dict]:
    """Chat SFT records (`{"messages": [...]}`, loss on the answer only) of the pages' questions:
    the page's own document and `noise` distractors in a seeded order inside the `<CTX>` block.
    `search(question)` gives (doc id, chunk text) pairs, best first: the distractors are the best
    chunks of other documents (hard negatives), never of a document in `exclude` (held out).
    `own_text(page)` is the page's own text in the block (default: its whole document; the
    index's first chunk of it, so training sees what retrieval gives at inference)."""
    rng = random.Random(seed)
    out = []
    for p in pages:
        own = own_text(p) if own_text is not None else p.document()
        for e in examples_of(p):
            others = [t for doc, t in search(e.question) if doc != p.doc_id and doc not in exclude][:noise]
            chunks = [own, *others]
            rng.shuffle(chunks)
            prompt = open_book_prompt(e.question, chunks)
            out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": e.answer}]})
    return out


def synthetic_pages(
    pages: Sequence[OpenBookPage], n: int, seed: int = 0, avoid: Iterable[str] = ()
) -> list[OpenBookPage]:
    """`n` made-up pages recombined from `pages` (the training pages), whose questions can be
    answered only from the `<CTX>` block, never from memory: a new command name (the start of one
    page's name and the end of another's, none of `pages` or `avoid`), a section and a package drawn from the
    pages', a description of another page's length whose words are each, with probability 1/2,
    replaced by a word of any page's description, and a third page's body under the new name.
    Counterfactual augmentation: on real pages alone a small model learns "this document -> this
    answer" and does not copy an unseen page's description (docs/notes.md, 2026-12-04)."""
    if n <= 0:
        return []
    if len(pages) < 2:
        raise ValueError(f"synthetic pages need at least 2 training pages, got {len(pages)}")
    rng = random.Random(f"synthetic:{seed}")
    real = {p.name for p in pages} | set(avoid)
    words = sorted({w for p in pages for w in p.description.split()})
    out: list[OpenBookPage] = []
    taken: set[str] = set()
    while len(out) < n:
        a, b, like, body_of, pkg_of, sec_of = (rng.choice(pages) for _ in range(6))
        name = a.name[: rng.randint(1, len(a.name))] + b.name[rng.randint(0, len(b.name) - 1) :]
        if name in real or name in taken or not re.fullmatch(r"[\w.+-]+", name):
            continue
        taken.add(name)
        description = " ".join(w if rng.random() < 0.5 else rng.choice(words) for w in like.description.split())
        body = re.sub(rf"(?<![\w-]){re.escape(body_of.name)}(?![\w-])", name, body_of.body)
        out.append(OpenBookPage(name, sec_of.section, pkg_of.package, description, body))
    return out


def iter_examples(pages: Iterable[OpenBookPage]) -> Iterator[Example]:
    for p in pages:
        yield from examples_of(p)
