"""The body of a shard actor: the language shards one Ray actor process holds.

Made remote by :class:`~rayhybrid.evaluation.shards.ActorShards` (importing this starts no
Ray); one process hosts several languages, each a
:class:`~rayhybrid.evaluation.search.ShardSearcher`, and every method that concerns a shard
takes its language.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from rayhybrid.evaluation import EvaluationError

__all__ = ["ShardActor"]

# Rows below which a shard call is not cut further for the worker threads (call_many).
_MIN_CHUNK = 256


def _tagged(exc: BaseException, lang: str) -> BaseException:
    """``exc`` with the language of the shard that raised it (``.shard``: pickled with the
    exception, so the driver can name the shard when the actor served several)."""
    try:
        exc.shard = lang  # type: ignore[attr-defined]
    except AttributeError:  # an exception type without a __dict__
        pass
    return exc


class ShardActor:
    """Actor body (made remote in :class:`ActorShards`, so importing this starts no Ray).

    Started empty (it can start while the encoders run); ``load_*`` gives it one language's
    shard, and a later ``load_*`` of that language replaces it (the next task of the same job).
    Every method that concerns a shard takes its language.
    """

    def __init__(self, device: str, threads: int) -> None:
        import faiss
        import torch

        # A CPU actor with several threads runs that many shard calls at once (call_many),
        # each on one BLAS thread; otherwise one call at a time on all of them. An actor gets
        # a fraction of the node; more BLAS threads than CPUs only thrash.
        self.workers = threads if device == "cpu" and threads > 1 else 1
        blas = 1 if self.workers > 1 else threads
        torch.set_num_threads(blas)
        faiss.omp_set_num_threads(blas)  # faiss's OpenMP: the top-k heaps (and IVF / HNSW)
        from threadpoolctl import ThreadpoolController

        self._pools = ThreadpoolController()  # after torch and faiss: it sees their BLAS too
        self._limits = self._pools.limit(limits=blas, user_api="blas")
        self.device, self.threads = device, blas
        self._executor = None
        self.last_chunks = 0  # row chunks of the last call_many on the worker threads
        if self.workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(
                self.workers, thread_name_prefix="shard", initializer=self._one_thread
            )
        self.searchers: dict[str, Any] = {}  # language -> ShardSearcher
        # What the first load would otherwise pay after encoding (ray.data's block reader
        # alone imports in ~1.2 s on two cores), done now while the encoders run.
        import ray.data.block  # noqa: F401

        from rayhybrid.evaluation import cache, encode, retrieval  # noqa: F401
        from rayhybrid.evaluation.search import f32_backend

        f32_backend()  # once per process, under this actor's BLAS thread limit

    def _one_thread(self) -> None:
        """A worker thread's own BLAS and OpenMP settings: one thread (an OpenMP library
        keeps its thread count per calling thread, so the actor's settings do not reach it;
        the limit is set once and never restored, so that workers cannot undo each other's)."""
        import faiss
        import torch

        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)
        self._pools.limit(limits=1, user_api="blas")

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

    def call_many(
        self, method: str, queries: np.ndarray, calls: list[tuple[str, np.ndarray, dict]]
    ) -> list[Any]:
        """``method`` on several of this actor's shards in one Ray call: one result per
        ``(lang, rows, kwargs)`` of ``calls``, in order.

        With several worker threads, each call's rows are cut into chunks that the threads
        take in turn, so that the shards' work spreads evenly over them (11 shards on 2
        threads would otherwise run 6 + 5); the chunks' results are joined back in row order,
        the same as one call: every result is per query row, and the scores do not depend on
        the block's shape (:func:`~rayhybrid.evaluation.search.f32_backend`).

        Raises:
            EvaluationError: a shard holds nothing. Any exception of a shard carries that
            shard's language in ``.shard``, for the driver's message.
        """
        from rayhybrid.evaluation.retrieval import call_shard, join_rows, row_chunk

        for lang, _, _ in calls:
            if lang not in self.searchers:
                raise _tagged(EvaluationError(f"shard {lang!r} holds no candidates"), lang)

        def run(lang: str, rows: np.ndarray, kwargs: dict) -> Any:
            try:
                return call_shard(self.searchers[lang], method, queries, rows, **kwargs)
            except Exception as exc:
                _tagged(exc, lang)
                raise

        if self._executor is None:
            with self._blas_limit():
                return [run(lang, rows, kwargs) for lang, rows, kwargs in calls]
        total = sum(len(rows) for _, rows, _ in calls)
        # About 8 chunks per thread over all calls (so the last ones to finish are short),
        # none below 256 rows (a smaller sgemm runs slower).
        size = max(_MIN_CHUNK, -(-total // (8 * self.workers)))
        jobs = []
        for lang, rows, kwargs in calls:
            bounds = np.linspace(0, len(rows), max(1, -(-len(rows) // size)) + 1).astype(int)
            parts = [
                row_chunk(method, rows, kwargs, slice(a, b)) for a, b in itertools.pairwise(bounds)
            ]
            jobs.append([self._executor.submit(run, lang, r, kw) for r, kw in parts])
        self.last_chunks = sum(len(futures) for futures in jobs)  # what the tests check
        return [join_rows([f.result() for f in futures]) for futures in jobs]
