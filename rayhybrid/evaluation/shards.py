"""One Ray actor per candidate language, each holding its shard's searcher.

The actors are thin: they hold a :class:`~rayhybrid.evaluation.search.ShardSearcher` and
run :func:`~rayhybrid.evaluation.retrieval.call_shard` on the query matrix, which the
driver puts into the object store once (every actor reads the same copy). A failure in any
actor stops all of them before the error reaches the caller, so no actor outlives a failed
evaluation.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from rayhybrid.evaluation import EvaluationError
from rayhybrid.evaluation.faiss_index import openblas_env
from rayhybrid.evaluation.search import check_shard

__all__ = ["ActorShards", "shard_resources"]

log = logging.getLogger(__name__)


class _ShardActor:
    """Actor body (made remote in :class:`ActorShards`, so importing this starts no Ray)."""

    def __init__(
        self,
        name: str,
        embeddings: np.ndarray,
        keys: np.ndarray,
        index: str,
        device: str,
        threads: int,
    ) -> None:
        import faiss
        import torch

        from rayhybrid.evaluation.search import ShardSearcher

        # A shard gets a fraction of the node; more BLAS threads than CPUs only thrash.
        # numpy's OpenBLAS scores, faiss's OpenMP runs the top-k heaps (and IVF / HNSW).
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        from threadpoolctl import threadpool_limits

        self._limits = threadpool_limits(threads, user_api="blas")
        self.searcher = ShardSearcher(name, embeddings, keys, index=index, device=device)

    def info(self) -> tuple[int, int]:
        return self.searcher.size, self.searcher.dim

    def blas(self) -> str:
        """The OPENBLAS_CORETYPE this actor process started with ('' if inherited unset)."""
        import os

        return os.environ.get("OPENBLAS_CORETYPE", "")

    def call(self, method: str, queries: np.ndarray, rows: np.ndarray, **kwargs: Any) -> Any:
        from rayhybrid.evaluation.retrieval import call_shard

        return call_shard(self.searcher, method, queries, rows, **kwargs)


def shard_resources(n_shards: int, cpus: float, gpus: float) -> tuple[float, float, int]:
    """(num_cpus, num_gpus, threads) per shard actor so that all shards fit at once.

    Ray accepts fractions only below 1, so shares above one CPU are rounded down to whole CPUs.
    """
    share = cpus / max(1, n_shards)
    num_cpus = float(math.floor(share)) if share >= 1 else math.floor(share * 100) / 100
    num_gpus = 0.0
    if gpus > 0:
        g = gpus / max(1, n_shards)
        num_gpus = float(math.floor(g)) if g >= 1 else math.floor(g * 100) / 100
    return max(num_cpus, 0.01), num_gpus, max(1, int(num_cpus))


class ActorShards:
    """A :class:`~rayhybrid.evaluation.retrieval.ShardPool` of Ray actors, one per language.

    Args:
        shards: language -> (embeddings [n, d], keys [n]).
        index: ``flat`` / ``ivf`` / ``hnsw``.
        use_gpu: place shards on GPUs (fractions of one when there are more shards than GPUs);
            None: when the cluster has GPUs.
        openblas_coretype: ``OPENBLAS_CORETYPE`` of the actor processes (``auto``: the best
            kernels for this CPU; empty: inherit), see :func:`~rayhybrid.evaluation.faiss_index.openblas_env`.

    Raises:
        EvaluationError: a shard fails to build (empty, non-finite, ...); the actors already
            started are stopped first.
    """

    def __init__(
        self,
        shards: dict[str, tuple[np.ndarray, np.ndarray]],
        index: str = "flat",
        use_gpu: bool | None = None,
        openblas_coretype: str = "auto",
    ) -> None:
        import ray

        if not shards:
            raise EvaluationError("no candidate shards to start: the task has no candidates")
        for lang, (emb, keys) in shards.items():  # fail before any actor starts
            check_shard(lang, emb, keys)
        res = ray.cluster_resources()
        gpus = float(res.get("GPU", 0.0)) if use_gpu or use_gpu is None else 0.0
        num_cpus, num_gpus, threads = shard_resources(len(shards), float(res.get("CPU", 1.0)), gpus)
        env = openblas_env(openblas_coretype)
        remote = ray.remote(_ShardActor)
        self._ray = ray
        self.actors: dict[str, Any] = {}
        for lang, (emb, keys) in shards.items():
            self.actors[lang] = remote.options(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                max_restarts=0,
                runtime_env={"env_vars": env} if env else None,
            ).remote(
                lang,
                ray.put(np.asarray(emb, np.float32)),
                np.asarray(keys, np.int64),
                index,
                "cuda" if num_gpus > 0 else "cpu",
                threads,
            )
        self._info = self._gather(
            {lang: a.info.remote() for lang, a in self.actors.items()}, "start"
        )

    def sizes(self) -> dict[str, int]:
        return {lang: size for lang, (size, _) in self._info.items()}

    def dims(self) -> dict[str, int]:
        return {lang: dim for lang, (_, dim) in self._info.items()}

    def put(self, array: np.ndarray) -> Any:
        return self._ray.put(array)

    def map(self, method: str, calls: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Call ``method`` on every listed shard in parallel; results keyed by language.

        Raises:
            EvaluationError: a shard raised or its actor died; every actor is stopped first.
        """
        if not self.actors:
            raise EvaluationError("the shard actors were already stopped")
        refs = {lang: self.actors[lang].call.remote(method, **kw) for lang, kw in calls.items()}
        return self._gather(refs, method)

    def _gather(self, refs: dict[str, Any], what: str) -> dict[str, Any]:
        ray = self._ray
        out = {}
        try:
            for lang, ref in refs.items():
                out[lang] = ray.get(ref)
        except Exception as exc:
            failed = next(lang for lang in refs if lang not in out)
            self.close()
            cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause else exc
            if isinstance(cause, ray.exceptions.RayActorError):
                msg = f"the actor of shard {failed!r} died during {what}"
            else:
                msg = (
                    f"shard {failed!r} failed during {what}: {type(cause).__name__}: "
                    f"{str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
                )
            raise EvaluationError(msg + f"; all {len(refs)} shard actors were stopped") from exc
        return out

    def close(self) -> None:
        """Kill every shard actor (idempotent)."""
        for actor in self.actors.values():
            try:
                self._ray.kill(actor)
            except Exception as exc:  # noqa: BLE001 - a dead actor is what we want anyway
                log.warning(f"[rayhybrid eval] stopping a shard actor: {exc}")
        self.actors = {}

    def __enter__(self) -> ActorShards:  # noqa: PYI034 - no subclasses
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
