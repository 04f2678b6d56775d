"""One Ray actor per candidate language, each holding its shard's searcher.

The actors are thin: they hold a :class:`~rayhybrid.evaluation.search.ShardSearcher` and
run :func:`~rayhybrid.evaluation.retrieval.call_shard` on the query matrix, which the
driver puts into the object store once (every actor reads the same copy). A failure in any
actor stops all of them before the error reaches the caller, so no actor outlives a failed
evaluation.

Memory and start-up (issue 14): an evaluation job starts its actors once, empty, before it
encodes (:meth:`ActorShards.start`), so their start-up overlaps with encoding, and keeps
them for all its tasks and settings. The encoder's output blocks stay in the object store
and each actor copies its own language's rows out of them (:meth:`ActorShards.load_blocks`),
so the driver never holds the candidate matrix and an actor holds its shard plus one block.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from rayhybrid.evaluation import EvaluationError
from rayhybrid.evaluation.faiss_index import openblas_env
from rayhybrid.evaluation.search import check_shard

__all__ = ["ActorShards", "shard_resources"]

log = logging.getLogger(__name__)


class _ShardActor:
    """Actor body (made remote in :class:`ActorShards`, so importing this starts no Ray).

    Started empty (it can start while the encoders run); ``load_*`` gives it a shard, and a
    later ``load_*`` replaces it (the next task of the same job, same language).
    """

    def __init__(self, name: str, device: str, threads: int) -> None:
        import faiss
        import torch

        # A shard gets a fraction of the node; more BLAS threads than CPUs only thrash.
        # numpy's OpenBLAS scores, faiss's OpenMP runs the top-k heaps (and IVF / HNSW).
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        from threadpoolctl import threadpool_limits

        self._limits = threadpool_limits(threads, user_api="blas")
        self.name, self.device, self.searcher, self.threads = name, device, None, threads

    def _blas_limit(self) -> Any:
        """The BLAS thread limit again, in the thread that runs this call: an OpenMP BLAS
        keeps its thread count per calling thread, and Ray may run a method in another
        thread than ``__init__`` (a multi-threaded sgemm would make float32 scores depend
        on the matrix shape, see :func:`~rayhybrid.evaluation.search.f32_backend`)."""
        from threadpoolctl import threadpool_limits

        return threadpool_limits(self.threads, user_api="blas")

    def _build(self, emb: np.ndarray, keys: np.ndarray, index: str) -> tuple[int, int]:
        from rayhybrid.evaluation.search import ShardSearcher

        self.searcher = None  # the previous task's shard goes before the next one is built
        with self._blas_limit():
            self.searcher = ShardSearcher(self.name, emb, keys, index=index, device=self.device)
        return self.info()

    def load_array(self, emb: np.ndarray, keys: np.ndarray, index: str) -> tuple[int, int]:
        return self._build(emb, keys, index)

    def load_blocks(
        self,
        blocks: list[Any],
        rows: np.ndarray,
        keys: np.ndarray,
        index: str,
        save_to: str | None = None,
        note: dict | None = None,
    ) -> tuple[int, int]:
        """Build the shard from encoder output blocks: row ``rows[i]`` is candidate ``keys[i]``.

        Blocks are fetched one at a time and only this shard's rows are copied out, so the
        actor holds its shard plus one block. ``save_to``: also write the shard as an
        embedding-cache entry (:func:`~rayhybrid.evaluation.cache.write_entry`).

        Raises:
            EvaluationError: a row of this shard is in none of the blocks.
        """
        import ray

        from rayhybrid.evaluation.cache import write_entry
        from rayhybrid.evaluation.encode import block_rows

        self.searcher = None
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
                f"shard {self.name!r}: {len(rows) - filled} of its {len(rows)} candidates are "
                "missing from the encoder's output blocks"
            )
        if save_to:
            write_entry(save_to, emb, note or {})
        return self._build(emb, keys, index)

    def load_file(self, path: str, keys: np.ndarray, index: str) -> tuple[int, int] | None:
        """Build the shard from an embedding-cache entry; None when the entry is unusable."""
        from rayhybrid.evaluation.cache import read_entry

        self.searcher = None
        emb = read_entry(path, len(keys))
        return None if emb is None else self._build(emb, keys, index)

    def info(self) -> tuple[int, int]:
        if self.searcher is None:
            raise EvaluationError(f"shard {self.name!r} holds no candidates (nothing loaded)")
        return self.searcher.size, self.searcher.dim

    def embeddings(self) -> np.ndarray:
        """The shard's candidate embeddings in key order (float32)."""
        cand = self.searcher._cand  # the searcher's own copy
        if not isinstance(cand, np.ndarray):
            cand = cand.cpu().numpy()
        return np.asarray(cand, np.float32)

    def memory(self) -> dict[str, int]:
        """This actor process's peak resident memory and its shard's bytes."""
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        shard = 0 if self.searcher is None else int(self.searcher._cand.nbytes)
        return {"peak_rss": int(peak), "shard_bytes": shard}

    def blas(self) -> str:
        """The OPENBLAS_CORETYPE this actor process started with ('' if inherited unset)."""
        import os

        return os.environ.get("OPENBLAS_CORETYPE", "")

    def call(self, method: str, queries: np.ndarray, rows: np.ndarray, **kwargs: Any) -> Any:
        from rayhybrid.evaluation.retrieval import call_shard

        with self._blas_limit():
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

    ``ActorShards(shards)`` starts one actor per language of ``shards`` and loads those
    arrays (each through the object store). :meth:`start` starts empty actors instead,
    once per evaluation job and while the encoders run, and ``load_*`` gives them each
    task's shards; the pool then answers for the languages of the last load.

    Args:
        shards: language -> (embeddings [n, d], keys [n]); None: start nothing yet.
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
        shards: dict[str, tuple[np.ndarray, np.ndarray]] | None,
        index: str = "flat",
        use_gpu: bool | None = None,
        openblas_coretype: str = "auto",
        *,
        languages: Sequence[str] = (),
        idle: bool = False,
    ) -> None:
        import ray

        if shards is not None and not shards:
            raise EvaluationError("no candidate shards to start: the task has no candidates")
        for lang, (emb, keys) in (shards or {}).items():  # fail before any actor starts
            check_shard(lang, emb, keys)
        langs = sorted(set(languages) | set(shards or {}))
        res = ray.cluster_resources()
        gpus = float(res.get("GPU", 0.0)) if use_gpu or use_gpu is None else 0.0
        num_cpus, num_gpus, threads = shard_resources(len(langs), float(res.get("CPU", 1.0)), gpus)
        # Idle actors started beside the encoder pool reserve no CPU: the encoders take every
        # CPU and a reservation would starve them; the shards compute only once encoding is
        # done. SPREAD still places them across the nodes of a cluster.
        self._options = {
            "num_cpus": 0.0 if idle else num_cpus,
            "num_gpus": num_gpus,
            "max_restarts": 0,
            "runtime_env": {"env_vars": env} if (env := openblas_env(openblas_coretype)) else None,
            **({"scheduling_strategy": "SPREAD"} if idle else {}),
        }
        self._device, self._threads, self.index = "cuda" if num_gpus > 0 else "cpu", threads, index
        self._ray, self._remote = ray, ray.remote(_ShardActor)
        self.actors: dict[str, Any] = {}
        self._info: dict[str, tuple[int, int]] = {}
        if num_gpus == 0 or not idle:  # GPU shards wait for the encoders to free the GPUs
            self._ensure(langs)
        if shards:
            self.load_arrays(shards)

    @classmethod
    def start(
        cls,
        languages: Sequence[str],
        index: str = "flat",
        use_gpu: bool | None = None,
        openblas_coretype: str = "auto",
    ) -> ActorShards:
        """Start empty shard actors for ``languages`` without waiting for them, so that their
        start-up (a process, torch and faiss imports) overlaps with encoding."""
        return cls(None, index, use_gpu, openblas_coretype, languages=languages, idle=True)

    def _ensure(self, langs: Sequence[str]) -> None:
        for lang in langs:
            if lang not in self.actors:
                self.actors[lang] = self._remote.options(**self._options).remote(
                    lang, self._device, self._threads
                )

    def _load(self, refs: dict[str, Any], what: str) -> dict[str, tuple[int, int] | None]:
        out = self._gather(refs, what)
        self._info = {lang: info for lang, info in out.items() if info is not None}
        return out

    def load_arrays(self, shards: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Load in-memory shards (each put into the object store once).

        Raises:
            EvaluationError: a shard is empty or fails to build (all actors are stopped).
        """
        for lang, (emb, keys) in shards.items():
            check_shard(lang, emb, keys)
        self._ensure(list(shards))
        put = self._ray.put
        self._load(
            {
                lang: self.actors[lang].load_array.remote(
                    put(np.asarray(emb, np.float32)), np.asarray(keys, np.int64), self.index
                )
                for lang, (emb, keys) in shards.items()
            },
            "start",
        )

    def load_blocks(
        self,
        blocks: list[Any],
        rows: dict[str, np.ndarray],
        keys: dict[str, np.ndarray],
        save_to: dict[str, str] | None = None,
        note: dict | None = None,
    ) -> None:
        """Each shard reads its rows out of the encoder's output ``blocks`` itself (the
        candidate matrix never passes through the driver); ``save_to``: cache entries to
        write, per language.

        Raises:
            EvaluationError: a shard fails to build (all actors are stopped).
        """
        self._ensure(list(rows))
        self._load(
            {
                lang: self.actors[lang].load_blocks.remote(
                    blocks, rows[lang], keys[lang], self.index, (save_to or {}).get(lang), note
                )
                for lang in rows
            },
            "start",
        )

    def load_files(self, paths: dict[str, str], keys: dict[str, np.ndarray]) -> bool:
        """Each shard loads its embedding-cache entry; False when any entry is unusable
        (then nothing is loaded: the caller encodes)."""
        self._ensure(list(paths))
        got = self._load(
            {
                lang: self.actors[lang].load_file.remote(path, keys[lang], self.index)
                for lang, path in paths.items()
            },
            "start",
        )
        if any(v is None for v in got.values()):
            self._info = {}
            return False
        return True

    def embeddings(self, lang: str) -> np.ndarray:
        """One shard's embeddings in key order (one shard at a time in the driver)."""
        return self._gather({lang: self.actors[lang].embeddings.remote()}, "embeddings")[lang]

    def memory(self) -> dict[str, dict[str, int]]:
        """Peak resident memory and shard bytes of every actor."""
        return self._gather({k: a.memory.remote() for k, a in self.actors.items()}, "memory")

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
