"""Encode queries and candidates with Ray Data: ``map_batches`` over an actor pool.

Each encoder actor loads the bi-encoder once and encodes batches of texts (one GPU per actor
when the cluster has GPUs, CPU threads otherwise). Queries and candidates go through one
dataset (each row carries its own prefix-applied text and token limit), so the pool starts
once. Rows are sorted by length first, so a batch pads to similar lengths, and carry their
row number, so the result is re-assembled in input order whatever order blocks finish in.
Ray Data shows its progress bar while it runs (``DataContext.enable_progress_bars``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from rayhybrid.evaluation import EvaluationError

if TYPE_CHECKING:
    from rayhybrid.config import ModelConfig

__all__ = ["encode_with_ray"]


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
) -> tuple[list[np.ndarray], float]:
    """Encode several groups of texts in one Ray Data pass.

    Args:
        groups: ``(texts, prefix, max_length)`` per group, e.g. queries and candidates.
        model_cfg: the bi-encoder config (pooling, normalisation, name).
        model_path: model folder overriding ``model_cfg.name``.
        batch_size: texts per ``map_batches`` batch.
        workers: encoder actors in the pool.
        use_gpu: one GPU per actor; None = when the cluster has GPUs.

    Returns:
        ``([embeddings per group], seconds)``; each ``[len(texts), dim]`` float32.

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
        _Encoder,
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
    emb = None
    seen = 0
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        if emb is None:
            emb = np.zeros((len(texts), batch["emb"].shape[1]), np.float32)
        emb[batch["row"]] = batch["emb"]
        seen += len(batch["row"])
    if seen != len(texts) or emb is None:
        raise EvaluationError(f"encode: expected {len(texts)} embeddings, got {seen}")
    owner_arr = np.asarray(owner)
    return [emb[owner_arr == g] for g in range(len(groups))], time.perf_counter() - start
