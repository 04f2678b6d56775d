"""The body of a shard actor: the language shards one Ray actor process holds.

Made remote by :class:`~rayhybrid.evaluation.shards.ActorShards` (importing this starts no
Ray); one process hosts several languages, each a
:class:`~rayhybrid.evaluation.search.ShardSearcher`, and every method that concerns a shard
takes its language.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rayhybrid.evaluation import EvaluationError

__all__ = ["ShardActor"]


class ShardActor:
    """Actor body (made remote in :class:`ActorShards`, so importing this starts no Ray).

    Started empty (it can start while the encoders run); ``load_*`` gives it one language's
    shard, and a later ``load_*`` of that language replaces it (the next task of the same job).
    Every method that concerns a shard takes its language.
    """

    def __init__(self, device: str, threads: int) -> None:
        import faiss
        import torch

        # An actor gets a fraction of the node; more BLAS threads than CPUs only thrash.
        # numpy's OpenBLAS scores, faiss's OpenMP runs the top-k heaps (and IVF / HNSW).
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        from threadpoolctl import ThreadpoolController

        self._pools = ThreadpoolController()  # after torch and faiss: it sees their BLAS too
        self._limits = self._pools.limit(limits=threads, user_api="blas")
        self.device, self.threads = device, threads
        self.searchers: dict[str, Any] = {}  # language -> ShardSearcher
        # What the first load would otherwise pay after encoding (ray.data's block reader
        # alone imports in ~1.2 s on two cores), done now while the encoders run.
        import ray.data.block  # noqa: F401

        from rayhybrid.evaluation import cache, encode, retrieval  # noqa: F401
        from rayhybrid.evaluation.search import f32_backend

        f32_backend()  # once per process, under this actor's BLAS thread limit

    def _blas_limit(self) -> Any:
        """The BLAS thread limit again, in the thread that runs this call: an OpenMP BLAS
        keeps its thread count per calling thread, and Ray may run a method in another
        thread than ``__init__`` (a multi-threaded sgemm would make float32 scores depend
        on the matrix shape, see :func:`~rayhybrid.evaluation.search.f32_backend`)."""
        # One controller, made at start: threadpool_limits() looks up the loaded libraries on
        # every call (2.3 ms here, per language and method call), the controller once.
        return self._pools.limit(limits=self.threads, user_api="blas")

    def _build(self, lang: str, emb: np.ndarray, keys: np.ndarray, index: str) -> tuple[int, int]:
        from rayhybrid.evaluation.search import ShardSearcher

        self.searchers.pop(lang, None)  # the previous task's shard goes before the next one
        with self._blas_limit():
            self.searchers[lang] = ShardSearcher(lang, emb, keys, index=index, device=self.device)
        return self.info(lang)

    def pid(self) -> int:
        import os

        return os.getpid()

    def load_array(
        self, lang: str, emb: np.ndarray, keys: np.ndarray, index: str
    ) -> tuple[int, int]:
        return self._build(lang, emb, keys, index)

    def load_blocks(
        self,
        lang: str,
        blocks: list[Any],
        rows: np.ndarray,
        keys: np.ndarray,
        index: str,
        save_to: str | None = None,
        note: dict | None = None,
    ) -> tuple[int, int]:
        """Build shard ``lang`` from encoder output blocks: row ``rows[i]`` is candidate ``keys[i]``.

        Blocks are fetched one at a time and only this shard's rows are copied out, so the
        actor holds its shards plus one block. ``save_to``: also write the shard as an
        embedding-cache entry (:func:`~rayhybrid.evaluation.cache.write_entry`).

        Raises:
            EvaluationError: a row of this shard is in none of the blocks.
        """
        import ray

        from rayhybrid.evaluation.cache import write_entry
        from rayhybrid.evaluation.encode import block_rows

        self.searchers.pop(lang, None)
        rows = np.asarray(rows, np.int64)
        order = np.argsort(rows, kind="stable")
        ranked = rows[order]
        lookup = np.zeros(int(rows.max()) + 1 if len(rows) else 0, bool)
        lookup[rows] = True
        emb, filled = None, 0
        for ref in blocks:  # a plain list: refs inside it are not resolved by Ray
            got, part = block_rows(ray.get(ref), lookup)
            if not len(got):
                continue
            if emb is None:
                emb = np.empty((len(rows), part.shape[1]), np.float32)
            emb[order[np.searchsorted(ranked, got)]] = part
            filled += len(got)
        if emb is None or filled != len(rows):
            raise EvaluationError(
                f"shard {lang!r}: {len(rows) - filled} of its {len(rows)} candidates are "
                "missing from the encoder's output blocks"
            )
        if save_to:
            write_entry(save_to, emb, note or {})
        return self._build(lang, emb, keys, index)

    def load_file(
        self, lang: str, path: str, keys: np.ndarray, index: str
    ) -> tuple[int, int] | None:
        """Build shard ``lang`` from an embedding-cache entry; None when the entry is unusable."""
        from rayhybrid.evaluation.cache import read_entry

        self.searchers.pop(lang, None)
        emb = read_entry(path, len(keys))
        return None if emb is None else self._build(lang, emb, keys, index)

    def info(self, lang: str) -> tuple[int, int]:
        if lang not in self.searchers:
            raise EvaluationError(f"shard {lang!r} holds no candidates (nothing loaded)")
        return self.searchers[lang].size, self.searchers[lang].dim

    def embeddings(self, lang: str) -> np.ndarray:
        """Shard ``lang``'s candidate embeddings in key order (float32)."""
        cand = self.searchers[lang]._cand  # the searcher's own copy
        if not isinstance(cand, np.ndarray):
            cand = cand.cpu().numpy()
        return np.asarray(cand, np.float32)

    def memory(self) -> dict[str, Any]:
        """This actor process's peak resident memory and the bytes of each of its shards."""
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        shards = {lang: int(s._cand.nbytes) for lang, s in self.searchers.items()}
        return {"peak_rss": int(peak), "shards": shards}

    def blas(self) -> str:
        """The OPENBLAS_CORETYPE this actor process started with ('' if inherited unset)."""
        import os

        return os.environ.get("OPENBLAS_CORETYPE", "")

    def call(
        self, lang: str, method: str, queries: np.ndarray, rows: np.ndarray, **kwargs: Any
    ) -> Any:
        from rayhybrid.evaluation.retrieval import call_shard

        if lang not in self.searchers:
            raise EvaluationError(f"shard {lang!r} holds no candidates (nothing loaded)")
        with self._blas_limit():
            return call_shard(self.searchers[lang], method, queries, rows, **kwargs)
