"""Metric definitions and aggregation (pure numpy; no Ray, no files).

Every metric is computed from the exact full-depth ranks of a query's relevant candidates
(relevance > 0) in the pool of its setting; ranks are 1-based over the whole pool, ties
broken as trec_eval does (``search`` module). With ``R`` relevant candidates at ranks
``r_1 < r_2 < ... < r_R``:

- ``map``: average precision over the full ranking, ``(1/R) sum_i i / r_i``, averaged over
  queries (trec_eval ``map`` on a full-depth run). The paper's headline number.
- ``map_at_K`` (K = 20): LAReQA / XTREME-R convention, the ``average_precision_at_k`` of the
  LAReQA code: ``sum_{i: r_i <= K} i / r_i`` divided by ``min(R, K)``. trec_eval's
  ``map_cut.K`` divides by ``R`` instead; the two agree whenever R <= K (always in
  XQuAD-R / MLQA-R, where R <= 11).
- ``r_at_K`` (K = 1, 10, 100): recall at K, the share of the R relevant candidates within the
  top K (trec_eval ``recall.K``). With one relevant candidate (mono, cross) it is the hit
  rate; in the multilingual pool (R = number of languages) R@1 is at most 1/R.
- ``mrr``: reciprocal rank of the best-ranked relevant candidate, ``1 / r_1`` (trec_eval
  ``recip_rank`` at full depth).
- ``mrr_at_K`` (K = 10): ``1 / r_1`` if ``r_1 <= K``, else 0 (trec_eval ``recip_rank`` on a
  run cut at depth K; MS MARCO's MRR@10).
- ``ndcg_at_K`` (K = 10, every task; LAReQA relevance is binary): ``DCG@K / IDCG@K`` with gain = the relevance
  grade, ``DCG@K = sum_{r_i <= K} g_i / log2(r_i + 1)``, the ideal from all relevant grades
  sorted (trec_eval ``ndcg_cut.K``).

Aggregation: metrics are averaged over the queries of a cell (mono X->X, cross X->Y,
multi X->all), then macro-averaged over cells: ``mono/<m>`` over languages X,
``cross/<m>`` over ordered pairs X != Y, ``multi/<m>`` over query languages X. Queries
with no relevant candidate in a cell's pool are excluded from it and counted.

Language bias (multilingual setting only, Huang et al. 2023 as used by Elmahdy et al.):

- ``rank_distance``: per query, take the best rank of its relevant candidates in each
  language, then (worst of these) - (best of these): the distance between its
  best-ranked and worst-ranked language in the full pool. Averaged over the queries of a
  query language, then macro-averaged over languages; lower is better. Queries with
  relevant candidates in fewer than two languages have no distance: they are excluded
  and counted (``bias/excluded``). ``rank_distance_micro`` is the mean over all queries,
  ``rank_distance_median`` their median.
- ``share_at_k/<Y>``: the share of the multilingual top-k that is in candidate language Y,
  averaged over queries per query language, then macro-averaged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

__all__ = [
    "BEIR_METRICS",
    "LAREQA_METRICS",
    "bias_metrics",
    "macro",
    "per_query",
    "rank_distances",
    "summarize",
    "topk_shares",
]

LAREQA_METRICS = ("map", "map_at_20", "r_at_1", "r_at_10", "mrr", "ndcg_at_10", "mrr_at_10")
BEIR_METRICS = LAREQA_METRICS + ("r_at_100",)

_NAME = re.compile(r"^(map|mrr|map_at_(\d+)|r_at_(\d+)|ndcg_at_(\d+)|mrr_at_(\d+))$")


def _check_name(name: str) -> re.Match:
    m = _NAME.match(name)
    if m is None:
        raise ValueError(
            f"unknown metric {name!r}; expected map, mrr, map_at_K, r_at_K, ndcg_at_K or mrr_at_K"
        )
    return m


def per_query(
    ranks: np.ndarray, gains: np.ndarray, names: Sequence[str] = LAREQA_METRICS
) -> dict[str, np.ndarray]:
    """Per-query values of each metric.

    Args:
        ranks: ``[n, m]`` int, 1-based ranks of each query's relevant candidates sorted
            ascending, padded with 0 (every row has at least one rank).
        gains: ``[n, m]`` relevance grades aligned with ``ranks`` (0 in padding).
        names: metric names (module docstring).

    Returns:
        name -> ``[n]`` float64 array.

    Raises:
        ValueError: unknown metric name, or a row without any relevant candidate.
    """
    ranks = np.asarray(ranks, np.int64)
    gains = np.asarray(gains, np.float64)
    valid = ranks > 0
    n_rel = valid.sum(axis=1)
    if ranks.shape[0] and (n_rel == 0).any():
        raise ValueError("per_query: every query needs at least one relevant candidate")
    safe = np.where(valid, ranks, 1).astype(np.float64)
    hits = np.cumsum(valid, axis=1)  # i for the i-th relevant (ranks sorted ascending)
    prec = np.where(valid, hits / safe, 0.0)
    out: dict[str, np.ndarray] = {}
    for name in names:
        m = _check_name(name)
        if name == "map":
            out[name] = prec.sum(1) / n_rel
        elif name == "mrr":
            out[name] = 1.0 / safe[:, 0] if ranks.shape[1] else np.zeros(0)
        elif m.group(2):
            k = int(m.group(2))
            out[name] = np.where(ranks <= k, prec, 0.0).sum(1) / np.minimum(n_rel, k)
        elif m.group(3):
            k = int(m.group(3))
            out[name] = (valid & (ranks <= k)).sum(1) / n_rel
        elif m.group(5):
            k = int(m.group(5))
            first = safe[:, 0] if ranks.shape[1] else np.zeros(0)
            out[name] = np.where(first <= k, 1.0 / first, 0.0)
        else:
            k = int(m.group(4))
            dcg = np.where(valid & (ranks <= k), gains / np.log2(safe + 1), 0.0).sum(1)
            ideal = -np.sort(-np.where(valid, gains, 0.0), axis=1)[:, :k]
            idcg = (ideal / np.log2(np.arange(2, ideal.shape[1] + 2))).sum(1)
            out[name] = np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)
    return out


def macro(values: Sequence[float]) -> float:
    """Unweighted mean over cells (NaN if there are none)."""
    vals = [v for v in values if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def rank_distances(ranks: np.ndarray, langs: np.ndarray) -> np.ndarray:
    """Per query: worst minus best of the per-language best ranks; NaN with < 2 languages.

    Args:
        ranks: ``[n, m]`` 1-based ranks in the multilingual pool (0 = padding).
        langs: ``[n, m]`` language of each relevant candidate (ignored in padding).
    """
    out = np.full(len(ranks), np.nan)
    for i, (row, lrow) in enumerate(zip(ranks, langs)):
        best: dict[str, int] = {}
        for r, lang in zip(row.tolist(), list(lrow)):
            if r > 0 and (lang not in best or r < best[lang]):
                best[lang] = r
        if len(best) >= 2:
            out[i] = max(best.values()) - min(best.values())
    return out


def topk_shares(top_langs: np.ndarray, languages: Sequence[str]) -> dict[str, np.ndarray]:
    """Per query and candidate language: share of the top-k list in that language.

    Args:
        top_langs: ``[n, k]`` language of each top-k entry (None where the list is short).
        languages: candidate languages to report.
    """
    denom = np.maximum(np.not_equal(top_langs, None).sum(1), 1)
    return {lang: (top_langs == lang).sum(1) / denom for lang in languages}


def bias_metrics(
    distances: dict[str, np.ndarray], shares: dict[str, dict[str, np.ndarray]], k: int
) -> dict[str, float]:
    """Flat ``bias/...`` metrics from per-query distances and shares per query language.

    Args:
        distances: query language -> per-query rank distances (NaN = excluded).
        shares: query language -> candidate language -> per-query shares.
        k: depth of the shares (named ``share_at_k``).
    """
    out: dict[str, float] = {}
    per_lang = {}
    excluded = 0
    for lang, d in sorted(distances.items()):
        ok = d[~np.isnan(d)]
        excluded += int(np.isnan(d).sum())
        if len(ok):
            per_lang[lang] = float(ok.mean())
            out[f"bias/rank_distance/{lang}"] = per_lang[lang]
    out["bias/rank_distance"] = macro(list(per_lang.values()))
    # Micro (mean over all queries) and median beside the macro: with unequal query counts
    # per language, or a long tail of far-apart languages, the three tell different stories.
    pooled = np.concatenate([d[~np.isnan(d)] for d in distances.values()] or [np.zeros(0)])
    out["bias/rank_distance_micro"] = float(pooled.mean()) if len(pooled) else float("nan")
    out["bias/rank_distance_median"] = float(np.median(pooled)) if len(pooled) else float("nan")
    out["bias/excluded"] = float(excluded)
    cand_langs = sorted({c for s in shares.values() for c in s})
    for c in cand_langs:
        out[f"bias/share_at_{k}/{c}"] = macro(
            [float(s[c].mean()) for s in shares.values() if c in s and len(s[c])]
        )
    return out


def summarize(
    blocks: dict[str, list], langs_of_key: np.ndarray, names: Sequence[str], share_k: int
) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    """Flat metrics of every cell, setting macro-averages and the language bias.

    Args:
        blocks: setting -> list of :class:`~rayhybrid.evaluation.retrieval.Block`.
        langs_of_key: candidate key -> language.
        names: metric names.
        share_k: depth of the multilingual top-k shares.

    Returns:
        ``(metrics, counts)``: metrics named ``<setting>/<cell>/<metric>``,
        ``<setting>/<metric>``, ``<setting>/queries``, ``<setting>/excluded``, ``bias/...``;
        counts: setting -> cell -> {"queries": n, "excluded": n}.
    """
    out: dict[str, float] = {}
    counts: dict[str, dict[str, int]] = {}
    for setting, cells in blocks.items():
        per_metric: dict[str, list[float]] = {n: [] for n in names}
        counts[setting] = {}
        for b in cells:
            counts[setting][b.label] = {"queries": len(b.rows), "excluded": int(b.excluded)}
            if not len(b.rows):
                continue
            for name, vals in per_query(b.rel_ranks, b.rel_gains, names).items():
                out[f"{setting}/{b.label}/{name}"] = float(vals.mean())
                per_metric[name].append(float(vals.mean()))
        for name, vals in per_metric.items():
            out[f"{setting}/{name}"] = macro(vals)
        out[f"{setting}/queries"] = float(sum(c["queries"] for c in counts[setting].values()))
        out[f"{setting}/excluded"] = float(sum(c["excluded"] for c in counts[setting].values()))
    if "multi" in blocks:
        distances, shares = {}, {}
        cand_langs = sorted(set(langs_of_key.tolist()))
        for b in blocks["multi"]:
            rel_langs = langs_of_key[np.clip(b.rel_keys, 0, None)]
            distances[b.qlang] = rank_distances(b.rel_ranks, rel_langs)
            top = b.top_keys[:, :share_k]
            top_langs = np.where(top >= 0, langs_of_key[np.clip(top, 0, None)], None)
            shares[b.qlang] = topk_shares(top_langs, cand_langs)
        out.update(bias_metrics(distances, shares, share_k))
    return out, counts
