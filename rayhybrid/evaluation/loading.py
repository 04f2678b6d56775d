"""Candidates into the language shards, queries into the driver: encode or the cache.

What the driver holds is bounded by the queries and per-row bookkeeping (ids, languages,
row numbers), never by the candidate matrix:

- queries: looked up in the embedding cache and stored there by the driver (their count is
  the size of a query set, not of a pool);
- candidates: one cache entry per language shard, read and written by the shard actors
  themselves (:mod:`rayhybrid.evaluation.cache`); on a miss the encoder's output blocks
  stay in the object store and every shard actor reads its own rows out of them
  (:meth:`~rayhybrid.evaluation.shards.ActorShards.load_blocks`). A candidate entry is
  per *shard* rather than per task, so a hit costs each actor one file of its own size;
  if any language misses, the whole candidate group is encoded again (one Ray Data pass;
  the same model on the same corpus hits or misses as a whole).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rayhybrid.datamodel import EvalTask
from rayhybrid.evaluation import EvaluationError
from rayhybrid.evaluation.retrieval import CandidateIndex

if TYPE_CHECKING:
    from rayhybrid.config import Config
    from rayhybrid.evaluation.shards import ActorShards

__all__ = ["encode_into_shards", "save_embeddings"]

log = logging.getLogger(__name__)


def encode_into_shards(
    cfg: Config,
    task: EvalTask,
    texts: list[str],
    model_path: str | None,
    pool: ActorShards,
) -> tuple[np.ndarray, float, dict[str, str]]:
    """Load the task's candidate shards into ``pool`` and return its query embeddings.

    Args:
        cfg: the config (``model`` prefixes, ``data`` max lengths, ``eval`` cache / batching).
        task: the evaluation task.
        texts: the text encoded for each candidate (task order).
        model_path: model folder overriding ``cfg.model.name``.
        pool: started shard actors (missing languages are started here).

    Returns:
        ``(query embeddings [n_queries, d], encode seconds, cache status of queries and
        candidates: "hit" / "miss" / "off")``.

    Raises:
        EvaluationError: an unusable cache folder (before encoding), encoding or a shard failed.
    """
    from rayhybrid.evaluation import encode
    from rayhybrid.evaluation.cache import EmbeddingCache

    cache = EmbeddingCache.for_model(cfg.eval.cache_dir, cfg.model, model_path)
    q_group = ([q.text for q in task.queries], cfg.model.query_prefix, cfg.data.max_query_length)
    c_prefix, c_len = cfg.model.passage_prefix, cfg.data.max_passage_length
    cands = CandidateIndex.from_task(task)
    row_of_key = np.argsort([cands.key_of[c.id] for c in task.candidates])
    keys = cands.shard_keys()
    rows = {lang: row_of_key[k] for lang, k in keys.items()}  # task rows in shard order
    paths = {}
    if cache:
        paths = {
            lang: str(cache.path([texts[i] for i in r], c_prefix, c_len))
            for lang, r in rows.items()
        }
    q_emb = cache.get(*q_group) if cache else None
    q_miss = q_emb is None
    c_hit = bool(paths) and all(Path(p).exists() for p in paths.values())
    c_hit = c_hit and pool.load_files(paths, keys)
    groups, keep = [], []
    if q_emb is None:
        groups.append(q_group)
        keep.append(False)
    if not c_hit:
        groups.append((texts, c_prefix, c_len))
        keep.append(True)
    seconds = 0.0
    if groups:
        start = time.perf_counter()
        found, _ = encode.encode_with_ray(
            groups,
            cfg.model,
            model_path,
            batch_size=cfg.eval.batch_size,
            workers=cfg.eval.encode_workers,
            keep=keep,
        )
        if q_emb is None:
            q_emb = found[0]
            if cache:
                cache.put(*q_group, q_emb)
        if not c_hit:
            stored = found[-1]
            pool.load_blocks(
                stored.blocks,
                {lang: stored.offset + r for lang, r in rows.items()},
                keys,
                save_to=paths or None,
                note={"prefix": c_prefix, "max_length": c_len},
            )
        seconds = time.perf_counter() - start  # encoding and the shards reading its blocks
    status = {
        "queries": "off" if cache is None else ("miss" if q_miss else "hit"),
        "candidates": "off" if cache is None else ("hit" if c_hit else "miss"),
    }
    if cache:
        log.info(
            f"[rayhybrid eval] embedding cache {cache.folder}: queries {status['queries']}, "
            f"candidates {status['candidates']} ({len(paths)} language shards)"
        )
    return q_emb, seconds, status


def save_embeddings(path: Path, task: EvalTask, q_emb: np.ndarray, pool: ActorShards) -> None:
    """Write ``embeddings.npz`` (queries, candidates in task order, their ids; no pickle).

    The candidate matrix is assembled on disk (a memory-mapped ``.npy``), one shard at a
    time from the actors, so the driver holds at most one shard of it; the ``.npz`` is the
    zip of ``.npy`` members that ``np.savez`` writes.

    Raises:
        EvaluationError: a shard actor failed.
    """
    cands = CandidateIndex.from_task(task)
    row_of_key = np.argsort([cands.key_of[c.id] for c in task.candidates])
    path.parent.mkdir(parents=True, exist_ok=True)
    dims = set(pool.dims().values())
    if len(dims) != 1:
        raise EvaluationError(f"save_embeddings: shards of different dimensions {sorted(dims)}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".candidates-", suffix=".npy")
    os.close(fd)
    try:
        mm = np.lib.format.open_memmap(tmp, "w+", np.float32, (len(task.candidates), dims.pop()))
        for lang, keys in cands.shard_keys().items():
            mm[row_of_key[keys]] = pool.embeddings(lang)  # actors keep their shard in key order
        mm.flush()
        del mm
        small = {
            "queries": np.ascontiguousarray(q_emb, np.float32),
            "query_ids": np.array([q.id for q in task.queries], dtype=str),
            "candidate_ids": np.array([c.id for c in task.candidates], dtype=str),
        }
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name in ("queries", "query_ids", "candidate_ids"):
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, small[name], allow_pickle=False)
            zf.write(tmp, "candidates.npy")
    finally:
        Path(tmp).unlink(missing_ok=True)
