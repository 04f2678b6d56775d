"""Run the settings over a pool of language shards and collect exact per-query ranks.

The same code drives local :class:`~rayhybrid.evaluation.search.ShardSearcher` objects
(:class:`LocalShards`, used in-process and as the reference in tests) and Ray actors
(:class:`rayhybrid.evaluation.shards.ActorShards`): a pool only has to ``put`` the query
matrix once and ``map`` one method call onto every shard, in parallel for actors.

Two rounds:

1. ``search`` on every shard: per query its top-k in that shard, and the exact score and
   in-shard rank of the query's relevant candidates that live there. That is all mono
   (X->X) and cross-lingual (X->Y) need, and the per-shard top-k lists merge into the
   multilingual top-k (:func:`~rayhybrid.evaluation.search.merge_topk`).
2. multilingual only: ``count_before`` on every shard with the scores of *all* relevant
   candidates of each query as thresholds; 1 + the sum over shards is each relevant
   candidate's exact rank in the whole pool. No full ranking travels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from rayhybrid.datamodel import EvalTask
from rayhybrid.evaluation import EvaluationError
from rayhybrid.evaluation.search import SearchResult, ShardSearcher, merge_topk

__all__ = [
    "ROW_ARGS",
    "SETTINGS",
    "Block",
    "CandidateIndex",
    "LocalShards",
    "Retrieval",
    "ShardPool",
    "call_shard",
    "check_settings",
    "join_rows",
    "row_chunk",
    "run_settings",
]

log = logging.getLogger(__name__)

SETTINGS = ("mono", "cross", "multi")


class ShardPool(Protocol):
    """Shards keyed by language: local searchers or Ray actors."""

    def sizes(self) -> dict[str, int]: ...
    def dims(self) -> dict[str, int]: ...
    def put(self, array: np.ndarray) -> Any: ...
    def map(self, method: str, calls: dict[str, dict[str, Any]]) -> dict[str, Any]: ...
    def close(self) -> None: ...


# Keyword arguments of each shard method that hold one row per query row: a call cut into
# row chunks (ShardActor.call_many) cuts them with the rows.
ROW_ARGS = {"search": ("rel_keys",), "count_before": ("thresholds", "threshold_keys")}


def call_shard(
    searcher: ShardSearcher, method: str, queries: np.ndarray, rows: np.ndarray, **kwargs: Any
) -> Any:
    """Run ``searcher.<method>`` on ``queries[rows]`` (shared by local pools and actors)."""
    if method not in ROW_ARGS:
        raise EvaluationError(f"unknown shard method {method!r}")
    return getattr(searcher, method)(queries[rows], **kwargs)


def row_chunk(method: str, rows: np.ndarray, kwargs: dict[str, Any], sl: slice) -> tuple:
    """``(rows[sl], kwargs)`` of one row chunk of a shard call, its row-aligned arguments cut
    alike (:data:`ROW_ARGS`)."""
    cut = {
        name: (value[sl] if name in ROW_ARGS.get(method, ()) and value is not None else value)
        for name, value in kwargs.items()
    }
    return rows[sl], cut


def join_rows(parts: list[Any]) -> Any:
    """The results of consecutive row chunks of one shard call, as one call returns them:
    every field of a :class:`SearchResult`, or the array of ``count_before``, is per row."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], SearchResult):
        return SearchResult(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("scores", "keys", "rel_scores", "rel_ranks")
            )
        )
    return np.concatenate(parts)


class LocalShards:
    """A :class:`ShardPool` of in-process searchers (no Ray)."""

    def __init__(self, searchers: dict[str, ShardSearcher]) -> None:
        self.searchers = searchers

    def sizes(self) -> dict[str, int]:
        return {lang: s.size for lang, s in self.searchers.items()}

    def dims(self) -> dict[str, int]:
        return {lang: s.dim for lang, s in self.searchers.items()}

    def put(self, array: np.ndarray) -> np.ndarray:
        return array

    def map(self, method: str, calls: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {lang: call_shard(self.searchers[lang], method, **kw) for lang, kw in calls.items()}

    def close(self) -> None:
        self.searchers = {}


@dataclass
class CandidateIndex:
    """Candidate ids, languages and tie-break keys of a task.

    ``key`` of a candidate = its position among all candidate ids sorted in *reverse*
    lexicographic order, so "lower key wins a tie" is trec_eval's tie order.
    """

    ids: np.ndarray  # key -> candidate id (object array)
    langs: np.ndarray  # key -> language
    key_of: dict[str, int]

    @classmethod
    def from_task(cls, task: EvalTask) -> CandidateIndex:
        ids = sorted({c.id for c in task.candidates}, reverse=True)
        if len(ids) != len(task.candidates):
            raise EvaluationError(
                f"task {task.name}: candidate ids are not unique "
                f"({len(task.candidates) - len(ids)} duplicates)"
            )
        lang = {c.id: c.lang for c in task.candidates}
        return cls(
            np.array(ids, dtype=object),
            np.array([lang[i] for i in ids], dtype=object),
            {cid: k for k, cid in enumerate(ids)},
        )

    def shard_keys(self) -> dict[str, np.ndarray]:
        return {lang: np.flatnonzero(self.langs == lang) for lang in sorted(set(self.langs))}


@dataclass
class Block:
    """Ranked lists of one (setting, query language, pool) cell, e.g. (cross, ar, de).

    Only queries with at least one relevant candidate in the pool are kept; ``excluded``
    counts the others. Relevant arrays are sorted by rank (best first), padded with
    key -1 / rank 0 / gain 0.
    """

    setting: str
    qlang: str
    pool: str  # candidate language, or "all" for multi
    rows: np.ndarray  # query indices
    top_scores: np.ndarray  # [n, k]
    top_keys: np.ndarray  # [n, k]
    rel_keys: np.ndarray  # [n, m]
    rel_ranks: np.ndarray  # [n, m], 1-based, exact over the whole pool
    rel_gains: np.ndarray  # [n, m]
    excluded: int = 0

    @property
    def label(self) -> str:
        return f"{self.qlang}-{self.pool}" if self.setting == "cross" else self.qlang


@dataclass
class Retrieval:
    """Everything metrics and outputs need: blocks per setting plus the id tables."""

    blocks: dict[str, list[Block]] = field(default_factory=dict)
    candidates: CandidateIndex | None = None
    query_ids: list[str] = field(default_factory=list)
    query_langs: list[str] = field(default_factory=list)
    top_k: int = 0
    full_depth: bool = False


def check_settings(settings: Sequence[str]) -> tuple[str, ...]:
    """Validate setting names. Raises EvaluationError naming the bad one."""
    for s in settings:
        if s not in SETTINGS:
            raise EvaluationError(
                f"eval.settings: unknown setting {s!r}; expected a subset of {list(SETTINGS)}"
            )
    if not settings:
        raise EvaluationError("eval.settings is empty; expected a subset of mono, cross, multi")
    return tuple(s for s in SETTINGS if s in settings)


def _relevant(task: EvalTask, cands: CandidateIndex) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query: (keys, gains) of its relevant candidates (relevance > 0) in the pool."""
    out = []
    for q in task.queries:
        judged = task.qrels.get(q.id, {})
        rel = sorted((cands.key_of[c], g) for c, g in judged.items() if g > 0 and c in cands.key_of)
        out.append(
            (np.array([k for k, _ in rel], np.int64), np.array([g for _, g in rel], np.float64))
        )
    return out


def _pad(rows: list[np.ndarray], fill: float, dtype: Any) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _make_block(
    setting: str,
    qlang: str,
    pool: str,
    rows: np.ndarray,
    scores: np.ndarray,
    keys: np.ndarray,
    rel: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> Block:
    """Keep rows with relevant candidates; sort each row's relevant by rank."""
    keep = np.array([len(r[0]) > 0 for r in rel], dtype=bool)
    rk, rr, rg = [], [], []
    for (k, r, g), ok in zip(rel, keep):
        if ok:
            order = np.lexsort((k, r))
            rk.append(k[order]), rr.append(r[order]), rg.append(g[order])
    return Block(
        setting,
        qlang,
        pool,
        rows[keep],
        scores[keep],
        keys[keep],
        _pad(rk, -1, np.int64),
        _pad(rr, 0, np.int64),
        _pad(rg, 0.0, np.float64),
        excluded=int((~keep).sum()),
    )


def run_settings(
    pool: ShardPool,
    task: EvalTask,
    q_emb: np.ndarray,
    settings: Sequence[str] = SETTINGS,
    top_k: int = 100,
    full_depth: bool = False,
    progress: bool = False,
) -> Retrieval:
    """Retrieve for every setting and collect exact ranks of the relevant candidates.

    Args:
        pool: shards keyed by candidate language, built with keys of
            :meth:`CandidateIndex.shard_keys` of the same task.
        task: the evaluation task (its queries in the order of ``q_emb``).
        q_emb: ``[n_queries, d]`` query embeddings.
        settings: subset of mono / cross / multi.
        top_k: depth of the returned lists (per shard, and of the merged multilingual list).
        full_depth: return whole rankings (every candidate) instead of the top-k; for small
            tasks whose TREC runs an independent tool should re-evaluate at full depth.

    Raises:
        EvaluationError: unknown setting, top-k larger than a shard, dimension mismatch.
    """
    settings = check_settings(settings)
    cands = CandidateIndex.from_task(task)
    sizes, dims = pool.sizes(), pool.dims()
    _check_pool(sizes, dims, q_emb, top_k, full_depth)
    q_langs = np.array([q.lang for q in task.queries], dtype=object)
    rel = _relevant(task, cands)
    rel_lang = [cands.langs[k] for k, _ in rel]
    ref = pool.put(np.ascontiguousarray(q_emb, dtype=np.float32))
    calls: dict[str, dict[str, Any]] = {}
    for lang in sizes:
        need = np.zeros(len(q_langs), dtype=bool)
        if "mono" in settings:
            need |= q_langs == lang
        if "cross" in settings:
            need |= q_langs != lang
        if "multi" in settings:
            need[:] = True
        rows = np.flatnonzero(need)
        rel_keys = _pad([rel[i][0][rel_lang[i] == lang] for i in rows], -1, np.int64)
        calls[lang] = {
            "queries": ref,
            "rows": rows,
            "k": sizes[lang] if full_depth else top_k,
            "rel_keys": rel_keys,
        }
    if progress:
        log.info(
            f"[rayhybrid eval] searching {len(q_langs)} queries in {len(sizes)} shards "
            f"({', '.join(f'{k}:{v}' for k, v in sizes.items())})"
        )
    found: dict[str, SearchResult] = pool.map("search", calls)
    out = Retrieval(
        candidates=cands,
        query_ids=[q.id for q in task.queries],
        query_langs=list(q_langs),
        top_k=top_k,
        full_depth=full_depth,
    )
    for setting in settings:
        if setting == "multi":
            out.blocks["multi"] = _multi_blocks(
                pool, ref, found, calls, q_langs, rel, sum(sizes.values()) if full_depth else top_k
            )
        else:
            out.blocks[setting] = _shard_blocks(setting, found, calls, q_langs, rel)
    return out


def _check_pool(
    sizes: dict[str, int], dims: dict[str, int], q_emb: np.ndarray, top_k: int, full_depth: bool
) -> None:
    if not sizes:
        raise EvaluationError("no candidate shards: the task has no candidates")
    for lang, n in sizes.items():
        if n == 0:
            raise EvaluationError(f"shard {lang!r} is empty (no candidates in this language)")
        if not full_depth and top_k > n:
            raise EvaluationError(
                f"eval.top_k={top_k} is larger than shard {lang!r} ({n} candidates); lower "
                f"eval.top_k to at most {min(sizes.values())} (the smallest shard)"
            )
        if q_emb.ndim != 2 or q_emb.shape[1] != dims[lang]:
            raise EvaluationError(
                f"query embeddings have dimension {q_emb.shape[-1]} but shard {lang!r} has "
                f"dimension {dims[lang]} (queries and candidates encoded with different models?)"
            )
    if top_k < 1:
        raise EvaluationError(f"eval.top_k must be >= 1, got {top_k}")


def _shard_blocks(
    setting: str,
    found: dict[str, SearchResult],
    calls: dict[str, dict[str, Any]],
    q_langs: np.ndarray,
    rel: list,
) -> list[Block]:
    """Mono (X->X) or cross (X->Y) blocks straight from the per-shard results."""
    blocks = []
    for pool_lang, res in found.items():
        rows, sent = calls[pool_lang]["rows"], calls[pool_lang]["rel_keys"]
        for qlang in sorted(set(q_langs[rows])):
            if (setting == "mono") != (qlang == pool_lang):
                continue
            sel = np.flatnonzero(q_langs[rows] == qlang)
            triples = []
            for j in sel:
                valid = sent[j] >= 0
                gain_of = dict(zip(rel[rows[j]][0].tolist(), rel[rows[j]][1].tolist()))
                k = sent[j][valid]
                triples.append(
                    (
                        k,
                        res.rel_ranks[j][valid],
                        np.array([gain_of[x] for x in k.tolist()], np.float64),
                    )
                )
            blocks.append(
                _make_block(
                    setting, qlang, pool_lang, rows[sel], res.scores[sel], res.keys[sel], triples
                )
            )
    return sorted(blocks, key=lambda b: (b.qlang, b.pool))


def _multi_blocks(
    pool: ShardPool,
    ref: Any,
    found: dict[str, SearchResult],
    calls: dict[str, dict[str, Any]],
    q_langs: np.ndarray,
    rel: list,
    depth: int,
) -> list[Block]:
    """Merge per-shard top-k; exact pool ranks from every shard's count of candidates before."""
    # With multi on, every shard saw every query in order, so rows line up across shards.
    thr = np.concatenate(
        [np.where(found[lang].rel_ranks > 0, found[lang].rel_scores, np.inf) for lang in found],
        axis=1,
    ).astype(np.float32)
    tkeys = np.concatenate([calls[lang]["rel_keys"] for lang in found], axis=1)
    tkeys = np.where(np.isfinite(thr), tkeys, -1)
    counts = pool.map(
        "count_before",
        {
            lang: {
                "queries": ref,
                "rows": calls[lang]["rows"],
                "thresholds": thr,
                "threshold_keys": tkeys,
            }
            for lang in found
        },
    )
    ranks = 1 + sum(counts.values())
    scores, keys = merge_topk([(r.scores, r.keys) for r in found.values()], depth)
    gain_of = [dict(zip(k.tolist(), g.tolist())) for k, g in rel]
    blocks = []
    for qlang in sorted(set(q_langs)):
        sel = np.flatnonzero(q_langs == qlang)
        triples = []
        for i in sel:
            valid = tkeys[i] >= 0
            k = tkeys[i][valid]
            triples.append((k, ranks[i][valid], np.array([gain_of[i][x] for x in k.tolist()])))
        blocks.append(_make_block("multi", qlang, "all", sel, scores[sel], keys[sel], triples))
    return blocks
