"""Encode queries and candidates with Ray Data: ``map_batches`` over an actor pool.

Each encoder actor loads the bi-encoder once and encodes batches of texts (one GPU per actor
when the cluster has GPUs, CPU threads otherwise). Queries and candidates go through one
dataset (each row carries its own prefix-applied text and token limit), so the pool starts
once. Rows are sorted by length first, so a batch pads to similar lengths, and carry their
row number, so the result is re-assembled in input order whatever order blocks finish in.
Ray Data shows its progress bar while it runs (``DataContext.enable_progress_bars``).

A group can stay in the object store (``keep``): its embeddings are then never gathered in
the driver; :class:`StoredEmbeddings` names the encoder's output blocks, which the language
shard actors read themselves (:mod:`rayhybrid.evaluation.shards`), so the driver's memory
does not grow with the candidate pool. The driver only fetches the rows of the groups it
returns as arrays (the queries), block by block.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rayhybrid.evaluation import EvaluationError

if TYPE_CHECKING:
    from rayhybrid.config import ModelConfig

__all__ = ["StoredEmbeddings", "block_rows", "encode_with_ray"]


@dataclass
class StoredEmbeddings:
    """One group's embeddings left in the Ray object store.

    ``blocks`` are the encoder's output blocks (columns ``row``, ``emb``) of the whole pass,
    shared by its groups; this group's i-th text is the block row whose ``row`` is
    ``offset + i``. Holding this keeps the blocks alive (the driver owns them).
    """

    blocks: list[Any]
    offset: int
    count: int


def block_rows(block: Any, wanted: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, embeddings)`` of an encoder output block, only the rows where ``wanted[row]``
    (all rows when ``wanted`` is None).

    Only the selected rows' embeddings are copied out of the block (a block fetched from the
    object store is shared memory; the rest of it is never turned into an array).
    """
    from ray.data.block import BlockAccessor

    acc = BlockAccessor.for_block(block)
    rows = np.asarray(acc.to_numpy("row"), np.int64)
    if wanted is not None:  # rows past the end of ``wanted`` are not wanted
        inside = np.flatnonzero(rows < len(wanted))
        sel = inside[wanted[rows[inside]]]
        if len(sel) < len(rows):
            if not len(sel):
                return rows[:0], np.zeros((0, 0), np.float32)
            acc = BlockAccessor.for_block(acc.take(sel))
            rows = rows[sel]
    return rows, np.asarray(acc.to_numpy("emb"), np.float32)


class _Encoder:
    """Ray Data callable class: builds the model once per actor, encodes batches."""

    def __init__(self, model_cfg: dict, model_path: str | None, threads: int) -> None:
        import torch

        from rayhybrid.config import ModelConfig, config_from_dict
        from rayhybrid.model import load_biencoder

        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        cfg = config_from_dict(model_cfg, ModelConfig)
        self.tokenizer, self.model = load_biencoder(cfg, model_path)
        self.model.to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from rayhybrid.model import encode_texts

        texts, max_len = batch["text"], batch["max_length"]
        emb = np.zeros((len(texts), self.model.dim), np.float32)
        for limit in np.unique(max_len):  # queries and passages have different token limits
            sel = np.flatnonzero(max_len == limit)
            emb[sel] = encode_texts(
                self.model,
                self.tokenizer,
                [str(t) for t in texts[sel]],
                max_length=int(limit),
                batch_size=len(sel),
                device=self.device,
            )
        return {"row": batch["row"], "emb": emb}


def encode_with_ray(
    groups: Sequence[tuple[Sequence[str], str, int]],
    model_cfg: ModelConfig,
    model_path: str | None = None,
    *,
    batch_size: int = 128,
    workers: int = 1,
    use_gpu: bool | None = None,
    keep: Sequence[bool] | None = None,
    encoder: type = _Encoder,
) -> tuple[list[np.ndarray | StoredEmbeddings], float]:
    """Encode several groups of texts in one Ray Data pass.

    Args:
        groups: ``(texts, prefix, max_length)`` per group, e.g. queries and candidates.
        model_cfg: the bi-encoder config (pooling, normalisation, name).
        model_path: model folder overriding ``model_cfg.name``.
        batch_size: texts per ``map_batches`` batch.
        workers: encoder actors in the pool.
        use_gpu: one GPU per actor; None = when the cluster has GPUs.
        keep: per group, True to leave its embeddings in the object store (a
            :class:`StoredEmbeddings` instead of an array); default: every group an array.
        encoder: the ``map_batches`` callable class (``_Encoder``; the memory benchmark
            passes one that makes vectors without a model, to reach a million rows).

    Returns:
        ``([embeddings per group], seconds)``; an array is ``[len(texts), dim]`` float32.

    Raises:
        EvaluationError: an empty group, or the encoders returned a wrong number of rows.
        ModelError: the model cannot be loaded (raised from the encoder actors).
    """
    import pyarrow as pa
    import ray

    from rayhybrid.config import config_to_dict

    start = time.perf_counter()
    texts, lengths, limits, owner = [], [], [], []
    for g, (group_texts, prefix, max_length) in enumerate(groups):
        if not len(group_texts):
            raise EvaluationError(f"encode: group {g} has no texts")
        for t in group_texts:
            texts.append(prefix + t)
            limits.append(max_length)
            owner.append(g)
    lengths = np.array([len(t) for t in texts])
    order = np.argsort(-lengths, kind="stable")  # long first: similar lengths share a batch
    limits_arr = np.asarray(limits, np.int64)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    if use_gpu is None:
        use_gpu = gpus > 0
    workers = max(1, min(workers, int(gpus) if use_gpu else workers))
    per_actor = max(1.0, float(int(cpus // workers))) if not use_gpu else 1.0
    # In-memory blocks (no read or repartition tasks competing with the encoders for CPUs),
    # enough for a pool of actors to share and for the progress bar to move.
    n_blocks = max(1, min(len(texts) // max(1, batch_size), max(64, 8 * workers)))
    tables = [
        pa.table(
            {
                "row": part.astype(np.int64),
                "text": [texts[i] for i in part],
                "max_length": limits_arr[part],
            }
        )
        for part in np.array_split(order, n_blocks)
    ]
    ds = ray.data.from_arrow(tables).map_batches(
        encoder,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        fn_constructor_kwargs={
            "model_cfg": config_to_dict(model_cfg),
            "model_path": model_path,
            "threads": int(per_actor),
        },
        num_cpus=per_actor,
        num_gpus=1 if use_gpu else 0,
    )
    keep = [False] * len(groups) if keep is None else [bool(k) for k in keep]
    owner_arr = np.asarray(owner)
    wanted = ~np.asarray(keep)[owner_arr]  # rows the driver gathers (not kept in the store)
    offsets = np.concatenate([[0], np.cumsum([len(g[0]) for g in groups])])
    out: dict[int, np.ndarray] = {}
    refs, seen = [], 0
    for bundle in ds.iter_internal_ref_bundles():  # block refs; the driver fetches no
        for entry in bundle.blocks:  # kept rows (only the wanted ones, block by block)
            # Ray 2.60: a BlockEntry (ref, metadata); older Ray: a (ref, metadata) tuple
            ref, meta = (entry.ref, entry.metadata) if hasattr(entry, "ref") else entry
            refs.append(ref)
            n = meta.num_rows
            if wanted.any():
                rows, emb = block_rows(ray.get(ref), wanted)
                for g in np.unique(owner_arr[rows]).tolist():
                    if g not in out:
                        out[g] = np.zeros((len(groups[g][0]), emb.shape[1]), np.float32)
                    mine = owner_arr[rows] == g
                    out[g][rows[mine] - offsets[g]] = emb[mine]
            if n is None:
                from ray.data.block import BlockAccessor

                n = BlockAccessor.for_block(ray.get(ref)).num_rows()
            seen += int(n)
    if seen != len(texts):
        raise EvaluationError(f"encode: expected {len(texts)} embeddings, got {seen}")
    result: list[np.ndarray | StoredEmbeddings] = []
    for g in range(len(groups)):
        if keep[g]:
            result.append(StoredEmbeddings(refs, int(offsets[g]), len(groups[g][0])))
        elif g in out:
            result.append(out[g])
        else:
            raise EvaluationError(f"encode: no embeddings came back for group {g}")
    return result, time.perf_counter() - start
