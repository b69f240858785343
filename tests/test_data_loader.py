"""WebDataset shards, the resumable packed-token loader, and the demo data set."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import tarfile

import pytest
import torch

from aion_train.commands import make_shards
from aion_train.data.demo import ensure_demo_data
from aion_train.data.loader import TokenLoader, expand_shards
from aion_train.data.shards import iter_shard_samples, read_manifest, verify_manifest, write_shards
from aion_train.data.text_sources import demo_documents
from aion_train.data.tokenizer import Tokenizer, train_tokenizer

N_DOCS, PER_SHARD, SEQ, MB = 48, 8, 32, 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """48 short real documents in 6 shards, plus a small tokenizer trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    docs = [d[:240] for d in demo_documents()[:N_DOCS]]
    samples = [{"__key__": f"d{i:03d}", "txt": t} for i, t in enumerate(docs)]
    paths = write_shards(samples, str(root), "train", PER_SHARD)
    tok = Tokenizer(train_tokenizer(demo_documents()[:120], str(root / "tok.model"), 600))
    return {"root": root, "docs": dict((s["__key__"], s["txt"]) for s in samples), "paths": paths, "tok": tok}


def loader(corpus, paths=None, **kw):
    args = dict(seq_len=SEQ, micro_batch_size=MB, seed=5, shuffle_buffer=8)
    args.update(kw)
    return TokenLoader(paths or corpus["paths"], corpus["tok"], **args)


def take(it, n):
    return [next(it) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(
        torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b)
    )


# ------------------------------------------------------------------ shards
def test_write_shards_layout_and_manifest_checksums(corpus):
    root = corpus["root"]
    assert [os.path.basename(p) for p in corpus["paths"]] == [f"train-{i:05d}.tar" for i in range(6)]
    m = read_manifest(str(root))
    split = m["splits"]["train"]
    assert (split["num_shards"], split["num_samples"], split["fields"]) == (6, N_DOCS, {"txt": N_DOCS})
    for entry, path in zip(split["shards"], corpus["paths"]):
        with open(path, "rb") as f:
            blob = f.read()
        assert entry["sha256"] == hashlib.sha256(blob).hexdigest()
        assert entry["bytes"] == len(blob) and entry["num_samples"] == PER_SHARD
        with tarfile.open(path) as t:  # plain tar with WebDataset member names
            assert len(t.getnames()) == PER_SHARD and t.getnames()[0].endswith(".txt")
    assert verify_manifest(str(root)) == []
    assert not [f for f in os.listdir(root) if ".tmp" in f]
    first = next(iter_shard_samples(corpus["paths"][0]))
    assert first["__key__"] == "d000" and first["txt"].decode() == corpus["docs"]["d000"]


def test_write_shards_multi_field_reproducible_and_verified(tmp_path):
    samples = [
        {"__key__": f"s{i}", "txt": f"caption {i}", "jpg": bytes([i]) * 10, "json": json.dumps({"i": i})}
        for i in range(5)
    ]
    a = write_shards(samples, str(tmp_path / "a"), "mm", 2)
    write_shards(samples, str(tmp_path / "b"), "mm", 2)
    assert len(a) == 3
    ma, mb = read_manifest(str(tmp_path / "a")), read_manifest(str(tmp_path / "b"))
    assert ma["splits"]["mm"]["fields"] == {"jpg": 5, "json": 5, "txt": 5}
    assert [e["sha256"] for e in ma["splits"]["mm"]["shards"]] == [
        e["sha256"] for e in mb["splits"]["mm"]["shards"]
    ]  # byte-reproducible
    got = [s for p in a for s in iter_shard_samples(p)]
    assert [s["jpg"] for s in got] == [bytes([i]) * 10 for i in range(5)]
    with open(a[1], "r+b") as f:  # flip one byte: the checksum notices
        f.seek(600)
        f.write(b"X")
    assert verify_manifest(str(tmp_path / "a")) == ["mm-00001.tar: sha256 mismatch"]
    with pytest.raises(ValueError):
        write_shards([{"__key__": "has.dot", "txt": "x"}], str(tmp_path / "c"), "x", 1)


# ------------------------------------------------------------------ packing
def test_packing_rows_are_full_and_labels_shifted(corpus):
    tok = corpus["tok"]
    ld = loader(corpus, loop=False, shuffle_buffer=0)
    batches = list(ld)
    docs = [t for _k, t in ld.iter_documents()]
    assert len(docs) == N_DOCS  # no shuffle: corpus order
    assert docs == list(corpus["docs"].values())
    stream = [t for d in docs for t in [tok.bos_id, *tok.encode(d), tok.eos_id]]
    rows = torch.cat([torch.cat([b["input_ids"][:, :1], b["labels"]], 1) for b in batches])
    n_rows = len(stream) // (SEQ + 1)
    assert rows.shape == (n_rows, SEQ + 1)
    assert rows.flatten().tolist() == stream[: n_rows * (SEQ + 1)]  # packed, in order, no waste
    for b in batches[:-1]:
        assert b["input_ids"].shape == b["labels"].shape == (MB, SEQ)
        assert b["input_ids"].dtype == torch.long
    for b in batches:
        assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])
        assert not (b["input_ids"] == tok.pad_id).any()
    # documents cross row boundaries: some row starts mid-document (not with bos)
    assert (rows[:, 0] != tok.bos_id).any()
    assert list(ld) and same(list(ld), batches)  # a finite loader restarts each pass


# ------------------------------------------------------------------ splitting
@pytest.mark.parametrize("dp_size,workers", [(1, 0), (3, 0), (2, 2), (4, 2)])
def test_ranks_disjoint_and_cover(corpus, dp_size, workers):
    """6 shards: by shard for S <= 6 splits, by sample for S = 8 (4 ranks x 2 workers)."""
    seen = []
    for r in range(dp_size):
        keys = [k for k, _t in loader(corpus, dp_rank=r, dp_size=dp_size, num_workers=workers).iter_documents()]
        assert keys and len(keys) == len(set(keys))
        seen.append(set(keys))
    for i in range(dp_size):
        for j in range(i + 1, dp_size):
            assert not seen[i] & seen[j]
    assert set().union(*seen) == set(corpus["docs"])


def test_ranks_get_different_batches(corpus):
    b0 = take(iter(loader(corpus, dp_rank=0, dp_size=2)), 3)
    b1 = take(iter(loader(corpus, dp_rank=1, dp_size=2)), 3)
    assert not any(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(b0, b1))


def test_shuffle_is_seeded(corpus):
    a = loader(corpus, shuffle_buffer=16)
    b = loader(corpus, shuffle_buffer=16)
    assert same(take(iter(a), 5), take(iter(b), 5))
    assert not same(
        take(iter(loader(corpus, seed=6, shuffle_buffer=16)), 5),
        take(iter(loader(corpus, seed=5, shuffle_buffer=16)), 5),
    )
    keys = [k for k, _ in loader(corpus, shuffle_buffer=16).iter_documents()]
    assert sorted(keys) == sorted(corpus["docs"]) and keys != sorted(keys)


def test_epochs_have_different_orders(corpus):
    s = loader(corpus, shuffle_buffer=16)._make_stream(0)
    e0 = [s.next_document()[0] for _ in range(N_DOCS)]
    e1 = [s.next_document()[0] for _ in range(N_DOCS)]
    assert s.epoch == 1
    assert sorted(e0) == sorted(e1) == sorted(corpus["docs"])
    assert e0 != e1


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize(
    "workers,dp_rank,dp_size,cut",
    [
        (0, 0, 1, 1),
        (0, 0, 1, 40),
        (0, 1, 2, 29),
        (2, 1, 2, 7),
        (2, 0, 1, 18),
    ],
)
def test_resume_is_bit_identical(corpus, workers, dp_rank, dp_size, cut):
    total = 45  # several epochs of this small corpus
    kw = dict(dp_rank=dp_rank, dp_size=dp_size, num_workers=workers)
    ref_loader = loader(corpus, **kw)
    ref = take(iter(ref_loader), total)
    assert ref_loader.epoch >= 1
    first = loader(corpus, **kw)
    head = take(iter(first), cut)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-serialisable
    assert len(json.dumps(state)) < 20_000
    fresh = loader(corpus, **kw)
    fresh.load_state_dict(state)
    tail = take(iter(fresh), total - cut)
    assert same(head + tail, ref)
    # continuing the interrupted loader itself, with a new iterator, matches too
    assert same(head + take(iter(first), total - cut), ref)


def test_resume_rejects_other_settings(corpus):
    a = loader(corpus)
    take(iter(a), 2)
    with pytest.raises(ValueError, match="does not match"):
        loader(corpus, seq_len=SEQ * 2).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="does not match"):
        loader(corpus, dp_size=2).load_state_dict(a.state_dict())


def test_finite_resume(corpus):
    full = list(loader(corpus, loop=False))
    a = loader(corpus, loop=False)
    it = iter(a)
    head = take(it, 3)
    b = loader(corpus, loop=False)
    b.load_state_dict(a.state_dict())
    assert same(head + list(b), full)


# ------------------------------------------------------------------ corrupt data
def test_truncated_shard_and_bad_sample_are_skipped(corpus, tmp_path, caplog):
    paths = []
    for p in corpus["paths"]:
        shutil.copy(p, tmp_path)
        paths.append(str(tmp_path / os.path.basename(p)))
    with open(paths[2], "rb") as f:
        blob = f.read()
    with tarfile.open(paths[2]) as t:
        fourth = t.getmembers()[3]
    with open(paths[2], "wb") as f:  # cut inside the 4th member's data
        f.write(blob[: fourth.offset_data + 100])
    readable = [s for s in iter_shard_samples(paths[2]) if isinstance(s, dict)]
    bad = write_shards(
        [{"__key__": "bad0", "txt": b"\xff\xfe not utf-8"}, {"__key__": "good0", "txt": "fine text"}],
        str(tmp_path / "x"),
        "bad",
        2,
    )
    paths += bad
    caplog.set_level(logging.WARNING, logger="aion_train.data")
    ld = loader(corpus, paths=paths, loop=False, shuffle_buffer=0)
    keys = [k for k, _ in ld.iter_documents()]
    assert set(keys) == (set(corpus["docs"]) - {f"d{i:03d}" for i in range(16 + len(readable), 24)}) | {"good0"}
    assert len(readable) == 3
    batches = list(ld)
    assert batches and ld.skipped == 2  # the rest of the cut shard + the bad sample
    msgs = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert any("train-00002.tar" in m and "unreadable tar" in m for m in msgs)
    assert any("bad-00000.tar" in m and "undecodable" in m for m in msgs)
    # in loop mode it is counted once (not again each epoch), and resuming past it is still exact
    a = loader(corpus, paths=paths)
    total = 2 * len(batches) + 5  # into the third epoch
    ref = take(iter(a), total)
    assert a.epoch == 2 and a.skipped == 2
    b = loader(corpus, paths=paths)
    head = take(iter(b), 11)
    c = loader(corpus, paths=paths)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert same(head + take(iter(c), total - 11), ref)
    assert c.skipped == a.skipped


def test_expand_shards(corpus):
    root = str(corpus["root"])
    assert expand_shards(os.path.join(root, "train-*.tar")) == corpus["paths"]
    assert expand_shards(os.path.join(root, "train-{00000..00005}.tar")) == corpus["paths"]
    with pytest.raises(FileNotFoundError):
        expand_shards([os.path.join(root, "nope.tar")])


# ------------------------------------------------------------------ demo data
def test_ensure_demo_data_builds_once_and_repairs(tmp_path):
    d = str(tmp_path / "demo")
    p = ensure_demo_data(d, 2048)
    assert len(p["train"]) >= 5 and len(p["val"]) >= 1
    m = read_manifest(d)
    n_train, n_val = m["splits"]["train"]["num_samples"], m["splits"]["val"]["num_samples"]
    assert 0.03 < n_val / (n_train + n_val) < 0.08
    assert Tokenizer(p["tokenizer"]).vocab_size == 2048
    assert verify_manifest(d) == []
    train_keys = {s["__key__"]: s["txt"] for f in p["train"] for s in iter_shard_samples(f)}
    val_txt = {s["txt"] for f in p["val"] for s in iter_shard_samples(f)}
    assert len(train_keys) == n_train and not val_txt & set(train_keys.values())
    mtime = os.path.getmtime(p["tokenizer"])
    assert ensure_demo_data(d, 2048) == p and os.path.getmtime(p["tokenizer"]) == mtime  # idempotent
    # a half-built directory (crash, or a file lost) and a stale temp dir are rebuilt/cleaned
    os.remove(p["train"][1])
    os.makedirs(str(tmp_path / ".demo.tmp-dead"))
    assert ensure_demo_data(d, 2048) == p
    assert verify_manifest(d) == [] and not os.path.exists(tmp_path / ".demo.tmp-dead")
    # another vocab size replaces it
    p2 = ensure_demo_data(d, 1024)
    assert Tokenizer(p2["tokenizer"]).vocab_size == 1024
    assert sorted(os.listdir(tmp_path)) == [".demo.lock", "demo"]


def test_demo_loader_end_to_end(tmp_path):
    p = ensure_demo_data(str(tmp_path / "demo"), 2048)
    tok = Tokenizer(p["tokenizer"])
    train = TokenLoader(p["train"], tok, 128, 8, dp_rank=0, dp_size=2, seed=1234)
    b = next(iter(train))
    assert b["input_ids"].shape == (8, 128) and int(b["input_ids"].max()) < 2048
    val = TokenLoader(p["val"], tok, 128, 8, dp_rank=1, dp_size=2, seed=0, loop=False, shuffle_buffer=0)
    n = sum(x["input_ids"].shape[0] for x in val)
    assert n > 0 and sum(x["input_ids"].shape[0] for x in val) == n


def _make_shards(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    make_shards.add_arguments(parser)
    return make_shards.run(parser.parse_args(list(argv)))


def test_make_shards_text_needs_no_system_package(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no espeak-ng, sox, ... on PATH
    assert _make_shards("--out", str(tmp_path / "d"), "--modality", "text", "--vocab-size", "1024", "--verify") == 0
    out = capsys.readouterr().out
    assert "train:" in out and "val:" in out and "sha256: ok" in out and "vocab 1024" in out
    assert not os.path.exists(tmp_path / "d" / "multimodal")


@pytest.mark.requires_binary("espeak-ng")  # --modality all: the multimodal set's speech clips
def test_make_shards_command(tmp_path, capsys):
    assert _make_shards("--out", str(tmp_path / "d"), "--vocab-size", "1024", "--verify") == 0
    out = capsys.readouterr().out
    assert "train:" in out and "val:" in out and "sha256: ok" in out and "vocab 1024" in out
    assert "multimodal" in out
