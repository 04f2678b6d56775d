"""What an approximate index costs: recall@k of its top-k against the exact top-k.

With ``eval.index`` other than ``flat`` the shards answer the top-k from a FAISS index
(re-scored exactly); the ranks behind every metric stay exact, but the written TREC runs and
the top-k language shares come from the index. :func:`measure_recall` draws a seeded sample
of queries (all languages together), asks every shard for its top-k twice, through the
index and through the exact path (``ShardSearcher.search(..., exact=True)``, the search a
``flat`` evaluation runs), and reports the share of the exact top-k the index found:

- per shard (language): over every sampled query;
- ``mono``: over the (query, shard) pairs of the same language; ``cross``: of different
  languages (both averaged over pairs, the way the per-shard lists are searched);
- ``multi``: the merged multilingual top-k of the approximate lists against the merged exact
  lists (one global exact search), over the sampled queries.

recall@k of a query = |approximate top-k ∩ exact top-k| / k (k = ``eval.top_k``, at most the
shard). Where several candidates tie with the k-th exact score, a tied candidate the index
returned instead counts as a miss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rayhybrid.evaluation.retrieval import ShardPool
from rayhybrid.evaluation.search import merge_topk

__all__ = ["measure_recall", "overlap", "recall_sample"]


def recall_sample(n_queries: int, size: int, seed: int) -> np.ndarray:
    """Sorted rows of a seeded sample of ``min(size, n_queries)`` queries, without repeats."""
    size = min(max(0, size), n_queries)
    return np.sort(np.random.default_rng(seed).choice(n_queries, size, replace=False))


def overlap(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per row, how many keys of ``found`` (>= 0; -1 pads) are among the keys of ``truth``."""
    hit = (found[:, :, None] == truth[:, None, :]) & (found[:, :, None] >= 0)
    return hit.any(axis=2).sum(axis=1)


def measure_recall(
    pool: ShardPool,
    q_emb: np.ndarray,
    q_langs: Sequence[str],
    k: int,
    sample: int,
    seed: int = 0,
    settings: Sequence[str] = ("mono", "cross", "multi"),
) -> dict[str, Any]:
    """recall@k of the pool's approximate top-k against its exact top-k on a query sample.

    Args:
        pool: shards built with an approximate index (local searchers or Ray actors).
        q_emb: ``[n, d]`` all query embeddings.
        q_langs: the language of each query.
        k: depth (``eval.top_k``); a shard smaller than k is compared at its size.
        sample: queries to draw (``eval.index_params.recall_queries``).
        seed: seed of the draw.
        settings: which of mono / cross / multi to report.

    Returns:
        ``{"k", "queries", "seed", "recall_at_k": {setting: value}, "per_shard": {lang:
        value}, "rows": [sampled query rows]}``.

    Raises:
        EvaluationError: from the shards (dimension mismatch, k out of range).
    """
    rows = recall_sample(len(q_emb), sample, seed)
    out: dict[str, Any] = {"k": k, "queries": len(rows), "seed": seed, "rows": rows.tolist()}
    if len(rows) == 0:
        return {**out, "recall_at_k": {}, "per_shard": {}}
    depth = {lang: min(k, n) for lang, n in pool.sizes().items()}
    ref = pool.put(np.ascontiguousarray(q_emb, dtype=np.float32))

    def topk(exact: bool) -> dict[str, Any]:
        return pool.map(
            "search",
            {
                lang: {"queries": ref, "rows": rows, "k": d, "exact": exact}
                for lang, d in depth.items()
            },
        )

    approx, exact = topk(False), topk(True)
    share = {lang: overlap(approx[lang].keys, exact[lang].keys) / depth[lang] for lang in depth}
    langs = np.asarray(q_langs, dtype=object)[rows]
    recall: dict[str, float] = {}
    for setting, same in (("mono", True), ("cross", False)):
        vals = [share[lang][(langs == lang) == same] for lang in depth]
        pairs = np.concatenate(vals)
        if setting in settings and len(pairs):
            recall[setting] = float(pairs.mean())
    if "multi" in settings:
        m = min(k, sum(depth.values()))
        a = merge_topk([(approx[lang].scores, approx[lang].keys) for lang in depth], m)[1]
        e = merge_topk([(exact[lang].scores, exact[lang].keys) for lang in depth], m)[1]
        recall["multi"] = float((overlap(a, e) / m).mean())
    out["recall_at_k"] = recall
    out["per_shard"] = {lang: float(v.mean()) for lang, v in share.items()}
    return out
