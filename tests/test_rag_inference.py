"""Retrieval at inference: LM rerank (query command, serving, bench helper) against the
log-likelihoods computed by hand from the model's forward; a continual memory served while
batches are ingested (every response reads one committed state); the EMA update rule
(convergence in expectation as (1 - eta)^t, durable through the log)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")
pytest.importorskip("bm25s")
torch = pytest.importorskip("torch")

from aion_train.retrieval.chunking import Chunk  # noqa: E402
from aion_train.retrieval.continual import ContinualIndex  # noqa: E402
from aion_train.retrieval.embedders import HashEmbedder  # noqa: E402

DOCS = [
    "the for statement iterates over the items of a sequence",
    "a while loop runs as long as its condition is true",
    "exceptions are raised with raise and caught with try",
    "the with statement wraps a block with a context manager",
    "list comprehensions build lists from loops over sequences",
    "functions are defined with def and return a value",
    "classes bundle data and the functions that act on it",
    "the import statement loads a module by its name",
]
QUERY = "a loop over a sequence"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """(model, tokenizer, checkpoint run folder): a seed-0 tiny model saved as a checkpoint."""
    from aion_train.checkpoint import save_sharded_checkpoint
    from aion_train.config import load_config
    from aion_train.data import Tokenizer
    from aion_train.data.demo import ensure_demo_data
    from aion_train.model import build_model

    root = tmp_path_factory.mktemp("rag_lm")
    cfg = load_config("configs/tiny_cpu.yaml", ["model.n_layers=2"])
    tok_path = ensure_demo_data(str(root / "demo"), cfg.model.vocab_size)["tokenizer"]
    model = build_model(cfg.model, seed=7).eval()
    save_sharded_checkpoint(root / "run", cfg.model, model.state_dict(), tp=1, ep=1)
    (root / "run" / "config.yaml").write_text(json.dumps({"data": {"tokenizer": str(tok_path)}}))
    return model, Tokenizer(tok_path), root / "run"


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    from aion_train.retrieval.store import write_index_dir

    out = tmp_path_factory.mktemp("rag_idx") / "idx"
    chunks = [Chunk(f"doc{i}", 0, t) for i, t in enumerate(DOCS)]
    write_index_dir(str(out), chunks, HashEmbedder(64).encode(DOCS), "hash-64", factory="Flat", params={})
    return out


def loglik_by_hand(model, tok, query: str, chunk: str) -> float:
    """Mean log p(query token | <CTX> chunk </CTX>, earlier query tokens), from the logits."""
    ctx = tok.encode(f"<CTX> {chunk.strip()} </CTX>")
    q = tok.encode(" " + query)
    ids = [tok.bos_id] + ctx + q
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    total = 0.0
    for j in range(len(q)):
        pos = len(ids) - len(q) + j  # the position of query token j
        total += float(torch.log_softmax(logits[pos - 1], -1)[ids[pos]])
    return total / len(q)


def expected_order(model, tok, query, texts):
    ll = [loglik_by_hand(model, tok, query, t) for t in texts]
    return sorted(range(len(texts)), key=lambda i: (-ll[i], i)), ll


def test_retriever_rerank_is_the_lm_order_of_the_hybrid_candidates(lm, index_dir):
    from aion_train.retrieval.hybrid import lm_loglik
    from aion_train.retrieval.store import Retriever

    model, tok, _ = lm
    r = Retriever(str(index_dir), embedder=HashEmbedder(64))
    pool = r.search(QUERY, k=6, mmr_lambda=None)  # the candidates: hybrid top 6
    order, ll = expected_order(model, tok, QUERY, [h.text for h in pool])
    got = r.search(QUERY, k=3, mmr_lambda=None, rerank=lm_loglik(model, tok), rerank_depth=6)
    assert [h.id for h in got] == [pool[i].id for i in order[:3]]
    np.testing.assert_allclose([h.extra["lm_loglik"] for h in got], [ll[i] for i in order[:3]], atol=1e-4)
    assert all(v < 0 for v in ll) and len(set(np.round(ll, 4))) == len(ll)  # distinct: the order is real
    assert [h.score for h in got] == [pool[i].score for i in order[:3]]  # the hybrid score is kept, not mixed
    assert [h.id for h in got] != [h.id for h in pool[:3]]  # the rerank changed something here


def test_query_command_rerank_with_checkpoint(lm, index_dir, capsys):
    from aion_train.cli import main

    model, tok, run = lm
    assert main(["query", str(index_dir), QUERY, "--k", "8", "--no-mmr", "--json"]) == 0
    pool = json.loads(capsys.readouterr().out)["hits"]
    rc = main(["query", str(index_dir), QUERY, "--k", "4", "--no-mmr", "--json", "--rerank", "--checkpoint", str(run)])
    assert rc == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    order, ll = expected_order(model, tok, QUERY, [h["text"] for h in pool])  # rerank depth 2k = 8
    assert [h["id"] for h in hits] == [pool[i]["id"] for i in order[:4]]
    np.testing.assert_allclose([h["extra"]["lm_loglik"] for h in hits], [ll[i] for i in order[:4]], atol=1e-4)
    assert main(["query", str(index_dir), QUERY, "--rerank"]) == 2  # no --checkpoint


def test_served_rerank_returns_sources_in_the_lm_order(lm, index_dir):
    from serve_fixtures import serving

    from aion_train.retrieval.store import Retriever

    model, tok, run = lm
    prompt = "a loop over the items"
    with serving(run, index=index_dir, k=2) as s:
        plain = s.http.post(
            "/v1/completions", json={"model": s.model, "prompt": prompt, "max_tokens": 1, "retrieval": {"k": 4}}
        ).json()
        rr = s.http.post(
            "/v1/completions",
            json={"model": s.model, "prompt": prompt, "max_tokens": 1, "retrieval": {"k": 2, "rerank": True}},
        ).json()
    cands = Retriever(str(index_dir), embedder=HashEmbedder(64)).search(prompt, k=4)  # the server's 2k pool
    assert [h["id"] for h in plain["aion"]["retrieval"]["hits"][0]] == [h.id for h in cands]
    order, ll = expected_order(model, tok, prompt, [h.text for h in cands])
    hits = rr["aion"]["retrieval"]["hits"][0]
    assert [h["source"] for h in hits] == [cands[i].source for i in order[:2]]
    np.testing.assert_allclose([h["lm_loglik"] for h in hits], [ll[i] for i in order[:2]], atol=1e-4)


def test_bench_rerank_mrr_by_hand():
    from aion_train.bench.retrieval import rerank_mrr

    texts = ["aa", "b", "cccc", "dd"]
    sources = ["s0", "s1", "s2", "s3"]
    # one query: candidates 0..3 with hybrid order 0, 1, 2, 3 (cosine falling, no BM25)
    cands = [(np.arange(4), np.zeros(4), np.array([0.9, 0.8, 0.7, 0.6]))]
    qs = [("test", "q", "s2")]
    rr, plain = rerank_mrr(cands, qs, texts, sources, 0.0, lambda q, t: -1.0 / len(t), depth=4)
    assert plain == 1 / 3  # s2 third by the hybrid score
    assert rr == 1.0  # longest text has the highest (least negative) score: first
    rr3, _ = rerank_mrr(cands, qs, texts, sources, 0.0, lambda q, t: -1.0 / len(t), depth=2)
    assert rr3 == 0.0  # s2 is not among the 2 candidates reranked


# ------------------------------------------------------------------ live memory served
def test_memory_served_while_ingesting_reads_whole_batches(lm, tmp_path):
    from serve_fixtures import serving

    _, _, run = lm
    n, batches = 4, 12
    mem_dir = tmp_path / "mem"
    mem = ContinualIndex(str(mem_dir), HashEmbedder(64))
    mem.put_many([(f"d{j}", f"doc {j} version 0 shared words", None) for j in range(n)])
    mem.close()
    reads, errors = [], []
    with serving(run, index=mem_dir, k=n, allow_unauthenticated_admin=True) as s:
        done = threading.Event()

        def ingest():
            import httpx

            try:
                http = httpx.Client(base_url=s.url, timeout=120, trust_env=False)
                for b in range(1, batches + 1):
                    docs = [{"id": f"d{j}", "text": f"doc {j} version {b} shared words"} for j in range(n)]
                    r = http.post("/admin/ingest", json={"documents": docs})
                    assert r.status_code == 200, r.text
                    assert r.json()["seqs"] == list(range(b * n + 1, (b + 1) * n + 1))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
            finally:
                done.set()

        th = threading.Thread(target=ingest)
        th.start()
        while not done.is_set() or len(reads) < 3:
            r = s.http.post(
                "/v1/completions", json={"model": s.model, "prompt": "shared words doc", "max_tokens": 1}
            ).json()
            reads.append(r["aion"]["retrieval"]["hits"][0])
        th.join()
        new = s.http.post("/admin/ingest", json={"documents": [{"id": "z", "text": "zebra quokka narwhal"}]})
        found = s.http.post(
            "/v1/completions", json={"model": s.model, "prompt": "zebra quokka narwhal", "max_tokens": 1}
        ).json()
        bad = s.http.post("/admin/ingest", json={"documents": [{"text": "no id"}]})
        no_alpha = s.http.post(
            "/v1/completions", json={"model": s.model, "prompt": "doc", "max_tokens": 1, "retrieval": {"alpha": 0.5}}
        )
    assert not errors, errors
    states = set()
    for hits in reads:
        assert len(hits) == n
        read_seq = hits[0]["read_seq"]
        assert read_seq % n == 0 and n <= read_seq <= (batches + 1) * n  # after a whole batch
        assert all(h["read_seq"] == read_seq for h in hits)
        assert all(read_seq - n < h["seq"] <= read_seq for h in hits)  # all from that batch: no mix
        states.add(read_seq)
    assert len(states) >= 2  # the reads did see the memory change under them
    assert new.json()["seq"] == (batches + 1) * n + 1
    assert found["aion"]["retrieval"]["hits"][0][0]["id"] == "z"
    assert bad.status_code == 400 and no_alpha.status_code == 400
    again = ContinualIndex(str(mem_dir), HashEmbedder(64))  # what was ingested is durable
    assert again.get("d0")["text"] == f"doc 0 version {batches} shared words" and "z" in again


def test_ingest_needs_an_api_key_or_the_flag(lm, tmp_path):
    from serve_fixtures import serving

    _, _, run = lm
    mem = ContinualIndex(str(tmp_path / "mem"), HashEmbedder(64))
    mem.add("a", "some text")
    mem.close()
    with serving(run, index=tmp_path / "mem", k=1) as s:
        r = s.http.post("/admin/ingest", json={"documents": [{"id": "b", "text": "x"}]})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_requires_api_key"
    from aion_train.cli import main

    # one writer: a memory is not served by several Ray replicas
    assert main(["serve", "--checkpoint", str(run), "--index", str(tmp_path / "mem"), "--ray"]) == 2


# ------------------------------------------------------------------ EMA update rule
def test_ema_update_converges_in_expectation_as_one_minus_eta_to_the_t(tmp_path):
    """e_0 = a (an old version), then e_t = e_{t-1} + eta (x_t - e_{t-1}) with x_t = mu + sigma z:
    E[e_t] - mu = (1 - eta)^t (a - mu), Var(e_t)_i = sigma^2 eta / (2 - eta) (1 - (1 - eta)^(2t))."""
    dim, trials, steps, eta, sigma = 8, 400, 12, 0.3, 0.5
    rng = np.random.default_rng(0)
    mu = rng.normal(size=dim).astype(np.float32)
    a = (mu + 3.0 * rng.normal(size=dim)).astype(np.float32)
    mem = ContinualIndex(str(tmp_path / "m"), dim=dim, update_rule="ema", eta=eta, fsync=False)
    ids = [(f"t{i}", "text", None) for i in range(trials)]
    mem.put_many(ids, np.tile(a, (trials, 1)))
    for t in range(1, steps + 1):
        obs = mu + sigma * rng.normal(size=(trials, dim))
        mem.put_many(ids, obs.astype(np.float32))
        E = np.stack([mem.vector(f"t{i}") for i in range(trials)]).astype(np.float64)
        err = E - mu
        bias = (1 - eta) ** t * (a - mu)
        var = sigma**2 * eta / (2 - eta) * (1 - (1 - eta) ** (2 * t))
        # the mean error over the trials: per coordinate within 5 standard errors of the formula
        assert np.all(np.abs(err.mean(0) - bias) < 5 * np.sqrt(var / trials) + 1e-5), t
        # mean squared error: E||e_t - mu||^2 = ||bias||^2 + dim * var, within 5 standard errors
        sq = (err**2).sum(1)
        want = float((bias**2).sum() + dim * var)
        assert abs(sq.mean() - want) < 5 * sq.std(ddof=1) / np.sqrt(trials), (t, sq.mean(), want)
    assert np.linalg.norm(err.mean(0)) < 0.05 * np.linalg.norm(a - mu)  # (0.7)^12 = 0.014
    mem.close()


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_ema_update_goes_through_the_log_and_survives_reopen(tmp_path, kind):
    from aion_train.retrieval.continual import _dec_vec
    from aion_train.retrieval.wal import WriteAheadLog

    path = str(tmp_path / "m")
    a, b, c = (np.array(v, np.float32) for v in ([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 2, 0]))
    mem = ContinualIndex(path, dim=4, update_rule="ema", eta=0.25, kind=kind)
    mem.add("d", "v1", vec=a)
    mem.add("d", "v2", vec=b)
    mem.put_many([("d", "v3", None), ("d", "v4", None)], np.stack([c, c]))  # twice in one batch: chained
    want = a + 0.25 * (b - a)
    want = want + 0.25 * (c - want)
    want = want + 0.25 * (c - want)
    np.testing.assert_allclose(mem.vector("d"), want, atol=1e-6)
    mem.close()
    last = WriteAheadLog(path + "/wal.jsonl").records[-1]
    np.testing.assert_allclose(_dec_vec(last["vec"]), want, atol=1e-6)  # the log holds the blend
    again = ContinualIndex(path, dim=4, update_rule="replace", kind=kind)  # replay reproduces it, whatever the rule
    np.testing.assert_allclose(again.vector("d"), want, atol=1e-6)
    assert again.get("d")["text"] == "v4" and again.replayed == 4
    again.checkpoint()
    again.close()
    third = ContinualIndex(path, dim=4, update_rule="ema", eta=0.25, kind=kind)
    np.testing.assert_allclose(third.vector("d"), want, atol=1e-6)
    third.add("d", "v5", vec=a)
    np.testing.assert_allclose(third.vector("d"), want + 0.25 * (a - want), atol=1e-6)
    replace = ContinualIndex(str(tmp_path / "r"), dim=4)  # the default rule: the new vector
    replace.add("d", "x", vec=a)
    replace.add("d", "y", vec=b)
    np.testing.assert_allclose(replace.vector("d"), b)
    info = json.load(open(path + "/memory.json"))
    assert info["update_rule"] == "ema" and info["eta"] == 0.25 and info["format"] == "aion-continual-memory"
