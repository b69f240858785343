"""The open-book task from this machine's manual pages: documents and answers checked against
man-db's own `whatis` and dpkg's `dpkg -S`; the split by document."""

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from aion_train.retrieval import open_book as ob

pytestmark = pytest.mark.skipif(
    not Path(ob.MAN_DIR, "man1").is_dir() or shutil.which("whatis") is None or shutil.which("dpkg") is None,
    reason="needs the manual pages, man-db and dpkg",
)


@pytest.fixture(scope="module")
def pages():
    return ob.read_man_pages()


def test_a_known_page(pages):
    ls = next(p for p in pages if p.name == "ls")
    assert (ls.section, ls.package, ls.description) == ("1", "coreutils", "list directory contents")
    assert "list directory contents" in ls.document() and "coreutils" in ls.document()
    assert "\\f" not in ls.document() and "\\-" not in ls.document()


def _whatis(name: str, section: str) -> list[str]:
    out = subprocess.run(["whatis", "-l", "-s", section, name], capture_output=True, text=True).stdout
    return [line.split(" - ", 1)[1].strip().rstrip(".") for line in out.splitlines() if " - " in line]


def test_answers_agree_with_whatis_and_dpkg(pages):
    """A seeded sample of 30 pages: the description is what `whatis` says, the package what
    `dpkg -S` says of the page's file."""
    assert len(pages) > 200
    sample = random.Random(0).sample(pages, 30)
    agree = 0
    for p in sample:
        got = _whatis(p.name, p.section)
        agree += ob.normalize_answer(p.description) in {ob.normalize_answer(g) for g in got}
        path = Path(ob.MAN_DIR, f"man{p.section}", f"{p.name}.{p.section}.gz")
        if path.exists():
            owner = subprocess.run(["dpkg", "-S", str(path)], capture_output=True, text=True).stdout
            assert owner.split(":")[0].strip() == p.package, (p.name, owner)
    assert agree >= 28, agree  # man-db's parser and ours may differ on an odd NAME line


def test_split_is_by_document_and_order_independent(pages):
    train, held = ob.split_pages(pages, 0.2, seed=0)
    assert {p.doc_id for p in train}.isdisjoint({p.doc_id for p in held})
    assert 0.12 < len(held) / len(pages) < 0.28
    r_train, r_held = ob.split_pages(list(reversed(pages)), 0.2, seed=0)
    assert {p.doc_id for p in r_held} == {p.doc_id for p in held}
    train_q = {(e.doc_id, e.question) for e in ob.iter_examples(train)}
    held_q = {(e.doc_id, e.question) for e in ob.iter_examples(held)}
    assert train_q.isdisjoint(held_q) and len(held_q) == 3 * len(held)


def test_every_answer_is_written_in_its_document(pages):
    for p in pages:
        doc = ob.normalize_answer(p.document().replace("\n", " "))
        for e in ob.examples_of(p):
            assert ob.normalize_answer(e.answer) in doc, (p.name, e.kind)


def test_answer_check():
    assert ob.is_correct("List directory contents.\nmore", "list directory contents")
    assert not ob.is_correct("list directories", "list directory contents")
    assert ob.is_correct(" coreutils ", "coreutils")


def test_synthetic_pages_are_answerable_only_from_their_document(pages):
    """Made-up pages: seeded, names of no real page, fields drawn from the training pages, every
    answer written in the page's own document, and no real (name, description) pair."""
    train, _ = ob.split_pages(pages, 0.2, seed=0)
    every = [p.name for p in pages]
    made = ob.synthetic_pages(train, 300, seed=3, avoid=every)
    assert made == ob.synthetic_pages(list(train), 300, 3, every) and made != ob.synthetic_pages(train, 300, 4, every)
    names = [p.name for p in made]
    assert len(set(names)) == 300 and not set(names) & {p.name for p in pages}
    words = {w for p in train for w in p.description.split()}
    assert all(set(p.description.split()) <= words for p in made)
    assert {p.package for p in made} <= {p.package for p in train}
    assert {p.section for p in made} <= {p.section for p in train}
    real = {p.description for p in train}
    assert sum(p.description in real for p in made) < 60  # most descriptions are new word sequences
    for p in made:
        doc = ob.normalize_answer(p.document())
        for e in ob.examples_of(p):
            assert ob.normalize_answer(e.answer) in doc, (p.name, e.kind)
    assert ob.synthetic_pages(train, 0) == []
    with pytest.raises(ValueError, match="at least 2 training pages"):
        ob.synthetic_pages(train[:1], 5)
