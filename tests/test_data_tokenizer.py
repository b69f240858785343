"""Demo corpus and SentencePiece tokenizer (aion_train.data.text_sources / tokenizer)."""

from __future__ import annotations

import os
import pickle

import pytest

from aion_train.data.text_sources import demo_documents, pack_paragraphs, split_paragraphs
from aion_train.data.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

VOCAB = 2048  # what configs/tiny_cpu.yaml uses


@pytest.fixture(scope="module")
def docs():
    return demo_documents()


@pytest.fixture(scope="module")
def tok(docs, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(docs, str(path), VOCAB)
    return Tokenizer(str(path))


def test_demo_documents_are_real_deterministic_text(docs):
    assert len(docs) >= 300  # ~500 on CPython 3.x with Debian licences
    assert sum(map(len, docs)) > 400_000
    assert docs == demo_documents()  # deterministic
    assert len(set(docs)) == len(docs)
    assert any("assert" in d and "statement" in d for d in docs)  # pydoc topics
    assert all(d.strip() and d.strip("\n") == d for d in docs)
    if os.path.isdir("/usr/share/common-licenses"):
        assert any("GNU GENERAL PUBLIC LICENSE" in d for d in docs)


def test_paragraph_split_and_pack():
    text = "a b\n\n\n  \nc\r\nd\n\n" + "x" * 50
    assert split_paragraphs(text) == ["a b", "c\nd", "x" * 50]
    assert pack_paragraphs(["aaaa", "bbbb", "cc"], target_chars=8, min_chars=2) == ["aaaa\n\nbbbb", "cc"]
    assert pack_paragraphs(["aaaa", "bbbb", "cc"], target_chars=8, min_chars=3) == ["aaaa\n\nbbbb\n\ncc"]


def test_vocab_size_and_reserved_ids(tok):
    assert tok.vocab_size == VOCAB == len(tok)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    ids = [tok.special_id(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(4, 4 + len(SPECIAL_TOKENS)))
    assert tok.special_id("<s>") == 2
    with pytest.raises(KeyError):
        tok.special_id("<NOPE>")


def test_other_vocab_size_is_exact(docs, tmp_path):
    path = train_tokenizer(docs[:100], str(tmp_path / "t.model"), 700)
    assert Tokenizer(path).vocab_size == 700
    with pytest.raises(ValueError):
        train_tokenizer(docs[:10], str(tmp_path / "u.model"), 200)  # < reserved + 256 bytes


def test_training_is_deterministic(docs, tmp_path):
    a = train_tokenizer(docs[:150], str(tmp_path / "a.model"), 800)
    b = train_tokenizer(docs[:150], str(tmp_path / "b.model"), 800)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()
    assert sorted(os.listdir(tmp_path)) == ["a.model", "b.model"]  # no temp files left


def test_round_trip_whole_corpus(tok, docs):
    n_tokens = 0
    for d in docs:
        ids = tok.encode(d)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == d
        n_tokens += len(ids)
    n_chars = sum(map(len, docs))
    assert 2.5 < n_chars / n_tokens < 6  # BPE actually merged (bytes would be 1.0)


@pytest.mark.parametrize(
    "text",
    [
        "  two leading spaces and trailing  ",
        "tabs\tand\nnewlines\n\n",
        "",
        "héllo wörld, 日本語, emoji 🤖, math ∑x²",
        "def f(x):\n    return x ** 2  # comment",
    ],
)
def test_round_trip_odd_text(tok, text):
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids(tok):
    for name in SPECIAL_TOKENS:
        sid = tok.special_id(name)
        ids = tok.encode(f"before{name}after")
        assert ids.count(sid) == 1
        assert tok.decode(ids) == f"before{name}after"
        assert tok.encode(name)[-1] == sid and len(tok.encode(name)) <= 2  # optional '▁' + id
    ids = tok.encode("<CTX>doc</CTX> q: <I></I><A></A>")
    for name in ("<CTX>", "</CTX>", "<I>", "</I>", "<A>", "</A>"):
        assert tok.special_id(name) in ids
    # special tokens are never produced from ordinary text
    assert not set(tok.encode("I A V T CTX < > / ")) & {tok.special_id(s) for s in SPECIAL_TOKENS}


def test_decode_drops_control_ids_and_pickles(tok):
    ids = tok.encode("hello world")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == "hello world"
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("hello world") == ids and clone.vocab_size == VOCAB


def test_piece_text_of_byte_level_tokens_is_their_text(tmp_path):
    """Logprob display strings: a byte-level BPE piece (`Ġworld`) shows as its text (" world");
    the pieces of an ASCII text join to the decoded text."""
    from tokenizers import Tokenizer as Fast
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from aion_train.data.hf_tokenizer import HFTokenizer

    fast = Fast(models.BPE())
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False)
    fast.train_from_iterator(["hello world, hello there", "the world is wide"] * 20, trainer)
    path = tmp_path / "tokenizer.json"
    fast.save(str(path))
    tok = HFTokenizer(str(path))
    text = "hello world, the wide world"
    ids = tok.encode(text)
    assert any(tok.id_to_piece(i).startswith("\u0120") for i in ids)  # raw pieces carry the Ġ mark
    assert "".join(tok.piece_text(i) for i in ids) == tok.decode(ids) == text
