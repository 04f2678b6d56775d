"""Metric definitions: hand-computed cases and pytrec_eval (trec_eval) on synthetic rankings."""

from __future__ import annotations

import numpy as np
import pytest

from rayhybrid.evaluation.metrics import (
    BEIR_METRICS,
    LAREQA_METRICS,
    bias_metrics,
    per_query,
    rank_distances,
    topk_shares,
)


def test_hand_computed_values():
    ranks = np.array([[1, 3, 0], [2, 0, 0], [5, 25, 30]])
    gains = np.array([[1, 1, 0], [2, 0, 0], [1, 1, 1]], float)
    m = per_query(ranks, gains, ("map", "map_at_20", "r_at_1", "r_at_10", "mrr", "ndcg_at_10"))
    assert m["map"] == pytest.approx([(1 + 2 / 3) / 2, 1 / 2, (1 / 5 + 2 / 25 + 3 / 30) / 3])
    # LAReQA AP@20: only hits within 20, divided by min(R, 20)
    assert m["map_at_20"] == pytest.approx([(1 + 2 / 3) / 2, 1 / 2, (1 / 5) / 3])
    assert m["r_at_1"] == pytest.approx([0.5, 0, 0])
    assert m["r_at_10"] == pytest.approx([1, 1, 1 / 3])
    assert m["mrr"] == pytest.approx([1, 1 / 2, 1 / 5])
    idcg0 = 1 + 1 / np.log2(3)
    assert m["ndcg_at_10"][0] == pytest.approx((1 + 1 / np.log2(4)) / idcg0)
    assert m["ndcg_at_10"][1] == pytest.approx((2 / np.log2(3)) / 2)


def test_mrr_at_10_and_binary_ndcg_by_hand():
    # best relevant at rank 1, 10, 11 (cut away), and a binary query with two relevant
    ranks = np.array([[1, 4], [10, 0], [11, 12], [2, 3]])
    gains = np.where(ranks > 0, 1.0, 0.0)
    m = per_query(ranks, gains, LAREQA_METRICS)
    assert m["mrr_at_10"] == pytest.approx([1, 1 / 10, 0, 1 / 2])
    assert m["mrr"] == pytest.approx([1, 1 / 10, 1 / 11, 1 / 2])
    ideal2 = 1 + 1 / np.log2(3)
    assert m["ndcg_at_10"] == pytest.approx(
        [
            (1 + 1 / np.log2(5)) / ideal2,
            (1 / np.log2(11)) / 1,
            0.0,
            (1 / np.log2(3) + 1 / np.log2(4)) / ideal2,
        ]
    )
    assert {"ndcg_at_10", "mrr_at_10"} <= set(LAREQA_METRICS) <= set(BEIR_METRICS)


def test_map_at_20_divides_by_min_of_relevant_and_20():
    ranks = np.arange(1, 31)[None, :]  # 30 relevant candidates at ranks 1..30
    m = per_query(ranks, np.ones_like(ranks, dtype=float), ("map_at_20", "map"))
    assert m["map_at_20"][0] == pytest.approx(1.0)  # 20 hits / min(30, 20)
    assert m["map"][0] == pytest.approx(1.0)


def test_unknown_metric_and_empty_rows_raise():
    with pytest.raises(ValueError, match="unknown metric 'p@5'"):
        per_query(np.array([[1]]), np.array([[1.0]]), ("p@5",))
    with pytest.raises(ValueError, match="at least one relevant"):
        per_query(np.array([[0, 0]]), np.zeros((1, 2)), ("map",))


def test_agrees_with_pytrec_eval_on_random_graded_rankings():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = np.random.default_rng(0)
    n_docs, runs, qrels, ranks, gains = 300, {}, {}, [], []
    for q in range(40):
        scores = rng.permutation(n_docs).astype(float)  # distinct scores: no tie questions
        n_rel = int(rng.integers(1, 15))
        rel = rng.choice(n_docs, n_rel, replace=False)
        grade = rng.integers(1, 4, n_rel)
        runs[f"q{q}"] = {f"d{d}": float(scores[d]) for d in range(n_docs)}
        qrels[f"q{q}"] = {f"d{d}": int(g) for d, g in zip(rel, grade)}
        rank_of = {d: r + 1 for r, d in enumerate(np.argsort(-scores))}
        order = sorted(zip((rank_of[d] for d in rel), grade))
        ranks.append([r for r, _ in order])
        gains.append([g for _, g in order])
    width = max(map(len, ranks))
    r = np.array([x + [0] * (width - len(x)) for x in ranks])
    g = np.array([x + [0] * (width - len(x)) for x in gains], float)
    mine = per_query(r, g, BEIR_METRICS)
    ev = pytrec_eval.RelevanceEvaluator(
        qrels, {"map", "recip_rank", "recall.1,10,100", "ndcg_cut.10", "map_cut.20"}
    )
    ref = ev.evaluate(runs)
    for name, key in (
        ("map", "map"),
        ("mrr", "recip_rank"),
        ("r_at_1", "recall_1"),
        ("r_at_10", "recall_10"),
        ("r_at_100", "recall_100"),
        ("ndcg_at_10", "ndcg_cut_10"),
        ("map_at_20", "map_cut_20"),
    ):  # R <= 14 < 20: LAReQA and trec_eval agree
        expect = [ref[f"q{q}"][key] for q in range(40)]
        assert mine[name] == pytest.approx(expect, abs=1e-9), name
    # MRR@10: trec_eval's recip_rank on the run cut at depth 10 (a query with no relevant
    # document in its top 10 scores 0 there).
    cut = {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:10]) for q, docs in runs.items()}
    ref10 = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
    expect = [ref10.get(f"q{q}", {"recip_rank": 0.0})["recip_rank"] for q in range(40)]
    assert mine["mrr_at_10"] == pytest.approx(expect, abs=1e-9)
    assert 0 < sum(e == 0 for e in expect) < 40  # both cases occur


def test_binary_relevance_agrees_with_pytrec_eval():
    """LAReQA tasks: every relevant candidate has grade 1 (nDCG@10 and MRR@10 there)."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = np.random.default_rng(1)
    n_docs, runs, qrels, ranks = 60, {}, {}, []
    for q in range(50):
        scores = rng.permutation(n_docs).astype(float)
        rel = rng.choice(n_docs, int(rng.integers(1, 12)), replace=False)
        runs[f"q{q}"] = {f"d{d}": float(scores[d]) for d in range(n_docs)}
        qrels[f"q{q}"] = {f"d{d}": 1 for d in rel}
        rank_of = {d: r + 1 for r, d in enumerate(np.argsort(-scores))}
        ranks.append(sorted(rank_of[d] for d in rel))
    width = max(map(len, ranks))
    r = np.array([x + [0] * (width - len(x)) for x in ranks])
    mine = per_query(r, (r > 0).astype(float), LAREQA_METRICS)
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(runs)
    cut = {q: dict(sorted(d.items(), key=lambda kv: -kv[1])[:10]) for q, d in runs.items()}
    ref10 = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
    assert mine["ndcg_at_10"] == pytest.approx(
        [ref[f"q{q}"]["ndcg_cut_10"] for q in range(50)], abs=1e-9
    )
    assert mine["mrr_at_10"] == pytest.approx(
        [ref10.get(f"q{q}", {"recip_rank": 0.0})["recip_rank"] for q in range(50)], abs=1e-9
    )


def test_rank_distance_uses_best_rank_per_language():
    ranks = np.array([[3, 10, 40, 0], [7, 9, 0, 0], [5, 0, 0, 0]])
    langs = np.array(
        [["en", "de", "en", None], ["de", "de", None, None], ["en", None, None, None]], dtype=object
    )
    d = rank_distances(ranks, langs)
    assert d[0] == 7  # en best 3, de best 10
    assert np.isnan(d[1]) and np.isnan(d[2])  # one language only: no distance
    out = bias_metrics({"en": d, "de": np.array([2.0, 4.0])}, {}, 10)
    assert out["bias/rank_distance/en"] == 7 and out["bias/rank_distance/de"] == 3
    assert out["bias/rank_distance"] == 5  # macro over query languages
    assert out["bias/excluded"] == 2


def test_topk_shares_ignore_short_lists():
    top = np.array([["en", "en", "de", "fr"], ["de", None, None, None]], dtype=object)
    s = topk_shares(top, ["de", "en", "fr"])
    assert s["en"].tolist() == [0.5, 0.0] and s["de"].tolist() == [0.25, 1.0]
