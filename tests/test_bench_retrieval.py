"""bench retrieval --quick: the speedup and rates are the ones its reported batch timings give;
the fields have their names and types; MRR@10 by hand."""

import pytest

from aion_train.bench import retrieval as bench_retrieval


def test_mrr_at_10_by_hand():
    ranked = [["a", "b"], ["c", "a", "a"], ["x"] * 10 + ["z"], ["q", "r", "s", "t"]]
    # first right answer at rank 1, rank 2, past the top 10 (no credit), rank 4
    assert bench_retrieval.mrr_at_k(ranked, ["a", "a", "z", "t"]) == (1 + 1 / 2 + 0 + 1 / 4) / 4


@pytest.fixture(scope="module")
def result():
    pytest.importorskip("faiss")
    pytest.importorskip("bm25s")
    return bench_retrieval.run_bench(**bench_retrieval.QUICK)


@pytest.mark.slow
def test_speedup_and_rates_follow_from_the_reported_timings(result):
    n, t_hnsw, t_exact = result["n_test_queries"], result["hnsw_search_s"], result["exact_search_s"]
    assert n > 0 and t_hnsw > 0 and t_exact > 0
    assert result["speedup"] == round(t_exact / t_hnsw, 2)
    assert result["qps"] == round(n / t_hnsw, 1) and result["exact_qps"] == round(n / t_exact, 1)


@pytest.mark.slow
def test_fields_have_their_names_and_types(result):
    for k in ("recall_at_10", "mrr_hybrid", "mrr_dense", "mrr_bm25", "mrr_hybrid_tune", "mrr_rerank"):
        assert isinstance(result[k], float) and 0 <= result[k] <= 1, k
    for k in ("n_chunks", "n_test_queries", "n_tune_queries", "dim", "ef_search", "ef_construction"):
        assert isinstance(result[k], int) and result[k] > 0, k
    assert result["dim"] == 384 and result["index"] == "HNSW32_SQ8"  # MiniLM, the default graph
    assert result["ef_search"] in bench_retrieval.EF_GRID and 0 <= result["alpha"] <= 1
    assert isinstance(result["embeddings_cached"], bool) and result["hnsw_build_s"] >= 0
    # the LM rerank: the quick run's 30 test queries, an untrained tiny model by default
    assert result["n_rerank_queries"] == min(30, result["n_test_queries"]) and result["rerank_depth"] == 10
    assert result["rerank_model"] == "model:configs/tiny_cpu.yaml:seed0"
    assert 0 <= result["mrr_hybrid_rerank_queries"] <= 1
