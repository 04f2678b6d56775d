"""Evaluation inside one process (no actors): quick dev-split metrics during training.

A training worker (and Ray Tune through it) calls :func:`evaluate_in_process` with the model
it is training. It runs the very same search, rank counting and metrics as the Ray job,
with in-process shards (:class:`~rayhybrid.evaluation.retrieval.LocalShards`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rayhybrid.datamodel import EvalTask
from rayhybrid.evaluation.metrics import LAREQA_METRICS, summarize
from rayhybrid.evaluation.retrieval import CandidateIndex, LocalShards, run_settings
from rayhybrid.evaluation.search import ShardSearcher
from rayhybrid.evaluation.uncertainty import per_query_tables, write_per_query

if TYPE_CHECKING:
    from rayhybrid.config import ModelConfig

__all__ = ["evaluate_in_process"]


def evaluate_in_process(
    model: Any,
    tokenizer: Any,
    task: EvalTask,
    model_cfg: ModelConfig,
    settings: Sequence[str] = ("mono", "cross", "multi"),
    top_k: int = 20,
    *,
    max_query_length: int = 64,
    max_passage_length: int = 128,
    batch_size: int = 64,
    metrics: Sequence[str] = LAREQA_METRICS,
    with_context: bool = False,
    with_title: bool = True,
    per_query_dir: str | Path | None = None,
) -> dict[str, float]:
    """Encode ``task`` with ``model`` and return flat metrics without a task prefix.

    Keys: ``mono/map_at_20``, ``cross/map_at_20``, ``multi/map_at_20``, ``bias/rank_distance`` and
    the rest of :func:`~rayhybrid.evaluation.metrics.summarize` (per cell, macro, counts).
    Top-k is clamped to the smallest shard (a dev split can be small); full-depth metrics
    do not depend on it.

    With ``per_query_dir`` the per-query values are written there too
    (:func:`~rayhybrid.evaluation.uncertainty.write_per_query`).

    Leaves the model in eval mode (the caller restores training mode).

    Raises:
        EvaluationError: unknown setting, empty task, dimension mismatch.
    """
    import torch

    from rayhybrid.evaluation import EvaluationError
    from rayhybrid.evaluation.run import candidate_texts
    from rayhybrid.model import encode_texts

    if not task.queries or not task.candidates:
        raise EvaluationError(f"task {task.name}: no queries or no candidates to evaluate")
    module = model.module if hasattr(model, "module") else model  # DDP wrapper
    try:
        device = str(next(module.parameters()).device)
    except StopIteration:
        device = "cpu"
    q_emb = encode_texts(
        module,
        tokenizer,
        [q.text for q in task.queries],
        prefix=model_cfg.query_prefix,
        max_length=max_query_length,
        batch_size=batch_size,
        device=device,
    )
    c_emb = encode_texts(
        module,
        tokenizer,
        candidate_texts(task, with_context, with_title),
        prefix=model_cfg.passage_prefix,
        max_length=max_passage_length,
        batch_size=batch_size,
        device=device,
    )
    cands = CandidateIndex.from_task(task)
    row_of_key = np.argsort([cands.key_of[c.id] for c in task.candidates])
    search_device = "cuda" if device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    pool = LocalShards(
        {
            lang: ShardSearcher(lang, c_emb[row_of_key[keys]], keys, device=search_device)
            for lang, keys in cands.shard_keys().items()
        }
    )
    k = max(1, min(top_k, min(pool.sizes().values())))
    retrieval = run_settings(pool, task, q_emb, settings, k)
    out, _ = summarize(retrieval.blocks, cands.langs, metrics, k)
    if per_query_dir is not None:  # so that runs (Tune trials) can be compared item by item
        write_per_query(
            per_query_tables(retrieval.blocks, retrieval.query_ids, cands.langs, metrics),
            per_query_dir,
        )
    return out
